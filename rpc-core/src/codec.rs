//! [`FrameCodec`]: length-prefixed frames on a byte stream, with a maximum frame length.
//!
//! ```text
//! +----------------+------------------------------------------+
//! | length: u32 BE | frame body (see `crate::frame`), length  |
//! |   (4 bytes)    | bytes; at most `max_frame_len`           |
//! +----------------+------------------------------------------+
//! ```
//!
//! Reading takes the same layout as tokio-util's
//! [`LengthDelimitedCodec`](tokio_util::codec::LengthDelimitedCodec) (4-byte
//! big-endian length, no adjustment), without it. The codec reads the length prefix, so
//! that an oversized frame is refused with an error naming its size and the limit, and
//! splits a frame off the read buffer only once the whole frame is buffered.
//! `LengthDelimitedCodec` reserves room for the body as soon as it has the prefix, which
//! would let a peer that announces a large frame and sends little of it hold a buffer of
//! the announced size; here the read buffer grows with what arrives. Splitting the frame
//! off directly also spares each frame a second parse of its prefix: the stock codec's
//! decode was ~4% of a broker thread routing 16-byte messages.
//!
//! Writing produces exactly the same layout but encodes the frame body straight into the
//! output buffer: `LengthDelimitedCodec`'s encoder takes a finished `Bytes`, which would
//! mean building every frame in a scratch buffer and copying it a second time. The tests
//! below check both directions against a stock `LengthDelimitedCodec`.

use bytes::{Buf, BufMut, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::error::{ConnectionError, ProtocolError};
use crate::frame::Frame;

/// Size of the length prefix.
pub const LENGTH_PREFIX_LEN: usize = 4;

/// Encodes and decodes [`Frame`]s with a 4-byte big-endian length prefix.
///
/// ```
/// use bytes::BytesMut;
/// use rpc_core::codec::FrameCodec;
/// use rpc_core::frame::Frame;
/// use tokio_util::codec::{Decoder, Encoder};
///
/// let mut codec = FrameCodec::new(1024);
/// let mut buf = BytesMut::new();
/// codec.encode(&Frame::Ping { nonce: 1 }, &mut buf).unwrap();
/// assert_eq!(&buf[..4], &[0, 0, 0, 10]); // the body is 10 bytes
/// assert_eq!(codec.decode(&mut buf).unwrap(), Some(Frame::Ping { nonce: 1 }));
/// ```
#[derive(Debug)]
pub struct FrameCodec {
    max_frame_len: usize,
}

impl FrameCodec {
    /// A codec refusing frame bodies over `max_frame_len` bytes (capped at `u32::MAX`, the
    /// most the length prefix can express).
    pub fn new(max_frame_len: usize) -> Self {
        let max_frame_len = max_frame_len.min(u32::MAX as usize);
        FrameCodec { max_frame_len }
    }

    /// The limit in force.
    pub fn max_frame_len(&self) -> usize {
        self.max_frame_len
    }

    /// Checks a frame against the limit without encoding it; returns its body length.
    pub fn check(&self, frame: &Frame) -> Result<usize, ConnectionError> {
        check_frame_len(frame, self.max_frame_len)
    }
}

/// The body length of `frame`, or [`ConnectionError::FrameTooLarge`] when it exceeds `limit`.
/// Senders call it before queueing, so that an oversized frame fails its own call rather
/// than the connection; the encoder calls it again for the length prefix.
pub(crate) fn check_frame_len(frame: &Frame, limit: usize) -> Result<usize, ConnectionError> {
    check_body_len(frame.encoded_len()?, limit)
}

/// `len`, or [`ConnectionError::FrameTooLarge`] when a frame body of that length exceeds
/// `limit`.
pub(crate) fn check_body_len(len: usize, limit: usize) -> Result<usize, ConnectionError> {
    if len > limit {
        return Err(ConnectionError::FrameTooLarge {
            size: len as u64,
            limit,
        });
    }
    Ok(len)
}

/// The body length that the frame at the start of `src` announces, once its length
/// prefix is all there.
pub(crate) fn announced_len(src: &[u8]) -> Option<usize> {
    let prefix = src.get(..LENGTH_PREFIX_LEN)?;
    Some((&prefix[..]).get_u32() as usize)
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = ConnectionError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, ConnectionError> {
        let Some(len) = announced_len(src) else {
            return Ok(None);
        };
        if len > self.max_frame_len {
            return Err(ConnectionError::FrameTooLarge {
                size: len as u64,
                limit: self.max_frame_len,
            });
        }
        if src.len() < LENGTH_PREFIX_LEN + len {
            // Not all here yet. Nothing is reserved for the rest: the read buffer grows
            // as bytes arrive, so a peer that sends a length prefix and then trickles (or
            // nothing) costs what it sent, not what it announced.
            return Ok(None);
        }
        // The whole frame is buffered: split it off, past its prefix.
        src.advance(LENGTH_PREFIX_LEN);
        let body = src.split_to(len).freeze();
        Ok(Some(Frame::decode(body)?))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, ConnectionError> {
        match self.decode(src)? {
            Some(frame) => Ok(Some(frame)),
            None if src.is_empty() => Ok(None),
            None => Err(ProtocolError::UnexpectedEof {
                buffered: src.len(),
            }
            .into()),
        }
    }
}

impl FrameCodec {
    /// Encodes a frame that a sender has checked already ([`FrameCodec::check`], as every
    /// frame a connection queues or writes directly is): the length prefix is filled in
    /// after the body, so the body's length is not computed a second time on its way
    /// out. A body over this codec's limit is taken back out of `dst` and refused.
    pub(crate) fn encode_checked(
        &self,
        frame: &Frame,
        dst: &mut BytesMut,
    ) -> Result<(), ConnectionError> {
        debug_assert!(frame.encoded_len().is_ok(), "unchecked frame: {frame:?}");
        let start = dst.len();
        dst.put_u32(0);
        frame.encode_validated(dst);
        let len = dst.len() - start - LENGTH_PREFIX_LEN;
        if len > self.max_frame_len {
            dst.truncate(start);
            return Err(ConnectionError::FrameTooLarge {
                size: len as u64,
                limit: self.max_frame_len,
            });
        }
        // At most `max_frame_len`, which is at most `u32::MAX`.
        dst[start..start + LENGTH_PREFIX_LEN].copy_from_slice(&(len as u32).to_be_bytes());
        Ok(())
    }
}

impl Encoder<&Frame> for FrameCodec {
    type Error = ConnectionError;

    fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<(), ConnectionError> {
        let len = self.check(frame)?;
        dst.reserve(LENGTH_PREFIX_LEN + len);
        // `check` capped `len` at `max_frame_len`, which is at most `u32::MAX`.
        dst.put_u32(len as u32);
        frame.encode_validated(dst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::frame::{Request, Response, Status};
    use tokio_util::codec::LengthDelimitedCodec;

    fn request(payload: usize) -> Frame {
        Frame::Request(Request {
            id: 1,
            method: "Echo.echo".into(),
            payload: Bytes::from(vec![0xAB; payload]),
            ..Request::default()
        })
    }

    #[test]
    fn encode_is_read_by_a_stock_length_delimited_codec() {
        let frame = request(100);
        let mut buf = BytesMut::new();
        FrameCodec::new(1024).encode(&frame, &mut buf).unwrap();
        let body = LengthDelimitedCodec::new()
            .decode(&mut buf)
            .unwrap()
            .unwrap();
        assert_eq!(Frame::decode(body.freeze()).unwrap(), frame);
    }

    #[test]
    fn a_checked_frame_over_the_codecs_limit_is_refused_and_leaves_the_buffer_as_it_was() {
        let mut buf = BytesMut::from(&b"earlier frames"[..]);
        let refused = FrameCodec::new(64).encode_checked(&request(100), &mut buf);
        assert!(matches!(
            refused,
            Err(ConnectionError::FrameTooLarge { limit: 64, .. })
        ));
        assert_eq!(&buf[..], b"earlier frames");
    }

    #[test]
    fn decode_reads_a_stock_length_delimited_codec() {
        let frame = Frame::Response(Response {
            id: 9,
            status: Status::OK,
            payload: Bytes::from_static(b"hi"),
            ..Response::default()
        });
        let mut body = BytesMut::new();
        frame.encode(&mut body).unwrap();
        let mut buf = BytesMut::new();
        LengthDelimitedCodec::new()
            .encode(body.freeze(), &mut buf)
            .unwrap();
        assert_eq!(FrameCodec::new(1024).decode(&mut buf).unwrap(), Some(frame));
    }

    #[test]
    fn read_single_frame_multi_packet() {
        let mut wire = BytesMut::new();
        let frame = request(300);
        FrameCodec::new(1024).encode(&frame, &mut wire).unwrap();
        let mut codec = FrameCodec::new(1024);
        let mut buf = BytesMut::new();
        let mut got = None;
        for chunk in wire.chunks(7) {
            buf.extend_from_slice(chunk);
            if let Some(f) = codec.decode(&mut buf).unwrap() {
                got = Some(f);
            }
        }
        assert_eq!(got, Some(frame));
        assert!(buf.is_empty());
    }

    #[test]
    fn read_oversized_frame_names_size_and_limit_before_reserving() {
        let mut buf = BytesMut::from(&[0u8, 0x10, 0, 0][..]); // declares 1 MiB
        let err = FrameCodec::new(1024).decode(&mut buf).unwrap_err();
        assert!(matches!(
            err,
            ConnectionError::FrameTooLarge {
                size: 1_048_576,
                limit: 1024
            }
        ));
        assert!(err.to_string().contains("1048576 bytes"), "{err}");
        assert!(err.to_string().contains("1024 bytes"), "{err}");
        assert!(
            buf.capacity() < 1024,
            "nothing reserved for the refused frame"
        );
    }

    #[test]
    fn read_partial_frame_reserves_nothing_beyond_what_arrived() {
        let mut buf = BytesMut::with_capacity(64);
        buf.extend_from_slice(&[0, 0x10, 0, 0]); // announces 1 MiB
        buf.extend_from_slice(&[0xAB; 40]);
        let mut codec = FrameCodec::new(2 * 1024 * 1024);
        assert_eq!(codec.decode(&mut buf).unwrap(), None);
        assert_eq!(buf.len(), 44, "nothing consumed");
        assert!(buf.capacity() < 1024, "reserved {} bytes", buf.capacity());
    }

    #[test]
    fn encode_oversized_frame_is_refused_and_writes_nothing() {
        let mut codec = FrameCodec::new(64);
        let mut buf = BytesMut::new();
        let err = codec.encode(&request(100), &mut buf).unwrap_err();
        assert!(
            matches!(err, ConnectionError::FrameTooLarge { limit: 64, .. }),
            "{err}"
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn eof_between_frames_is_a_clean_close() {
        let mut codec = FrameCodec::new(1024);
        assert_eq!(codec.decode_eof(&mut BytesMut::new()).unwrap(), None);
    }

    #[test]
    fn eof_in_the_head_or_the_body_is_an_error() {
        let mut wire = BytesMut::new();
        FrameCodec::new(1024)
            .encode(&request(10), &mut wire)
            .unwrap();
        for cut in [2, 4, 9] {
            let mut codec = FrameCodec::new(1024);
            let mut buf = BytesMut::from(&wire[..cut]);
            assert_eq!(codec.decode(&mut buf).unwrap(), None);
            let err = codec.decode_eof(&mut buf).unwrap_err();
            assert!(
                matches!(err, ConnectionError::Protocol(ProtocolError::UnexpectedEof { buffered }) if buffered == cut),
                "cut at {cut}: {err}"
            );
        }
    }
}
