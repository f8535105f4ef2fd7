//! `Vec<u8>` arguments and return values travel as one byte string: the same bytes on the
//! wire as serde's sequence of `u8`, without a serde call per byte.

mod common;

use common::{Transport, serve_and_connect};
use courier::__private::{AsBytes, ByteVec};
use courier::{Bincode, Format, Server, ServerConfig};
use proptest::prelude::*;

#[courier::service]
trait Blobs {
    /// The bytes reversed, and the tag as it came.
    async fn reverse(&self, data: Vec<u8>, tag: std::vec::Vec<u8>) -> (Vec<u8>, Vec<u8>);
    /// The bytes as they came.
    async fn echo(&self, data: Vec<u8>) -> Vec<u8>;
}

struct Store;

impl Blobs for Store {
    async fn reverse(&self, mut data: Vec<u8>, tag: Vec<u8>) -> (Vec<u8>, Vec<u8>) {
        data.reverse();
        (data, tag)
    }

    async fn echo(&self, data: Vec<u8>) -> Vec<u8> {
        data
    }
}

proptest! {
    #[test]
    fn a_byte_string_is_encoded_exactly_like_the_sequence_of_u8(data in proptest::collection::vec(any::<u8>(), 0..600), n in any::<u32>()) {
        let fast = Bincode::encode(&(AsBytes(&data), n)).unwrap();
        let slow = Bincode::encode(&(&data, n)).unwrap();
        prop_assert_eq!(&fast, &slow);
        let (back, m): (ByteVec, u32) = Bincode::decode(&slow).unwrap();
        prop_assert_eq!(back.0, data.clone());
        prop_assert_eq!(m, n);
        let (back, _): (Vec<u8>, u32) = Bincode::decode(&fast).unwrap();
        prop_assert_eq!(back, data);
    }
}

/// A `ByteVec` takes its bytes however the decoder hands them over: borrowed from the
/// input (bincode from a slice, as the RPC layer decodes), as an owned buffer (bincode from
/// a reader, which cannot lend), or as a sequence of `u8`.
#[test]
fn a_byte_vec_decodes_from_borrowed_bytes_an_owned_buffer_and_a_sequence() {
    use serde::Deserialize;
    use serde::de::value::{Error, SeqDeserializer};

    let data: Vec<u8> = (0..=255).chain(0..10).collect();
    let encoded = Bincode::encode(&AsBytes(&data)).unwrap();

    let borrowed: ByteVec = Bincode::decode(&encoded).unwrap();
    assert_eq!(borrowed.0, data);

    let mut reader = &encoded[..];
    let owned: ByteVec =
        bincode::serde::decode_from_std_read(&mut reader, bincode::config::standard()).unwrap();
    assert_eq!(owned.0, data);
    assert!(reader.is_empty());

    let sequence =
        ByteVec::deserialize(SeqDeserializer::<_, Error>::new(data.iter().copied())).unwrap();
    assert_eq!(sequence.0, data);
}

#[cfg(feature = "postcard")]
#[test]
fn postcard_also_encodes_both_alike() {
    use courier::format::Postcard;
    let data: Vec<u8> = (0..=255).collect();
    assert_eq!(
        Postcard::encode(&AsBytes(&data)).unwrap(),
        Postcard::encode(&data).unwrap()
    );
}

#[tokio::test]
async fn byte_vectors_of_every_size_round_trip_through_a_service() {
    let server = Server::new(ServerConfig::default()).add_service(Store.into_service());
    let client = BlobsClient::new(serve_and_connect(Transport::Memory, server).await);
    for size in [0usize, 1, 16, 4096, 1 << 20] {
        let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        assert_eq!(
            client.echo(data.clone()).await.unwrap(),
            data,
            "{size} bytes"
        );
        let (reversed, tag) = client.reverse(data.clone(), b"t".to_vec()).await.unwrap();
        assert_eq!(tag, b"t");
        assert!(
            reversed.iter().eq(data.iter().rev()),
            "{size} bytes reversed"
        );
    }
}

/// Calls made among others are encoded into the connection's send queue from their
/// arguments where they lie: held inline up to 46 encoded bytes (45 bytes of data and
/// their length), in `Bytes` beyond that, and sent as a whole frame past what the queue
/// takes encoded (16 KiB). Every size comes back whole, to its own caller.
#[tokio::test]
async fn calls_in_flight_together_of_every_size_each_get_their_own_bytes_back() {
    let server = Server::new(ServerConfig::default()).add_service(Store.into_service());
    let client = BlobsClient::new(serve_and_connect(Transport::Tcp, server).await);
    let sizes = [0usize, 1, 44, 45, 46, 47, 300, 16 * 1024, 40_000];
    let calls = (0..180).map(|n| {
        let client = client.clone();
        let size = sizes[n % sizes.len()];
        async move {
            let data: Vec<u8> = (0..size).map(|i| ((i + n) % 251) as u8).collect();
            let back = client.echo(data.clone()).await.unwrap();
            assert!(back == data, "call {n} ({size} bytes) got other bytes back");
        }
    });
    futures_util::future::join_all(calls).await;
}
