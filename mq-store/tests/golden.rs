//! Golden vectors of the segment file format: the exact bytes `docs/STORAGE.md` shows.
//!
//! Each vector is encoded with `mq_store::record` and compared with the bytes written
//! out below, decoded back, and compared with the hex dumps and field tables of
//! `docs/STORAGE.md` (found by their `<!-- golden: … -->` markers), so that the code,
//! this file and the document cannot drift apart. A last test has a real stream write
//! them into its first segment. A change to any of these bytes is a change of the
//! on-disk format: existing stores would no longer open.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use mq_store::clock::ManualClock;
use mq_store::fault::SimFs;
use mq_store::fs::Fs;
use mq_store::record::{
    self, Kind, Record, SegmentHeader, decode, decode_segment_header, encode, encode_headers,
    encode_segment_header,
};
use mq_store::{MAX_MSG_SIZE, Publish, SharedNames, Store, StreamConfig};

/// The document the vectors must agree with.
const STORAGE_MD: &str = include_str!("../../docs/STORAGE.md");

/// The largest record the store reads back.
const LIMIT: u32 = MAX_MSG_SIZE + record::HEADER_LEN as u32;

/// Every message vector's time: 2023-11-14T22:13:20Z, in nanoseconds since the epoch.
const T: i64 = 1_700_000_000_000_000_000;

/// The salt of the vectors' segment. (A real segment draws its own at random.)
const SALT: u64 = 0x0123_4567_89AB_CDEF;

/// (s) The header of segment 1, with [`SALT`].
const SEGMENT_HEADER: [u8; 32] = [
    0x43, 0x4F, 0x55, 0x52, 0x53, 0x45, 0x47, 0x00, // magic "COURSEG\0"
    0x01, 0x00, // version 1
    0x00, 0x00, // flags
    0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // first_seq 1
    0xEF, 0xCD, 0xAB, 0x89, 0x67, 0x45, 0x23, 0x01, // salt 0x0123456789ABCDEF
    0x33, 0xFB, 0xBC, 0xAA, // crc 0xAABCFB33
];

/// (a) Message 1 on `orders.eu`, no headers, payload `hi`, at `T`.
const MESSAGE: [u8; 47] = [
    0x2F, 0x00, 0x00, 0x00, // len 47
    0x7C, 0x80, 0x35, 0x04, // crc 0x0435807C
    0x01, // kind: message
    0x00, // flags
    0x09, 0x00, // subject_len 9
    0x00, 0x00, 0x00, 0x00, // headers_len 0
    0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // seq 1
    0x00, 0x00, 0x2A, 0x36, 0xFE, 0x9C, 0x97, 0x17, // time T
    0x99, 0xCD, 0xFF, 0x3B, // hcrc 0x3BFFCD99
    0x6F, 0x72, 0x64, 0x65, 0x72, 0x73, 0x2E, 0x65, 0x75, // "orders.eu"
    0x68, 0x69, // payload "hi"
];

/// The headers block of (b): `Region: eu`, then `Msg-Id: 42` (the stream writes the
/// `Msg-Id` last).
const HEADERS_BLOCK: [u8; 28] = [
    0x06, 0x00, // name_len 6
    0x52, 0x65, 0x67, 0x69, 0x6F, 0x6E, // "Region"
    0x02, 0x00, 0x00, 0x00, // value_len 2
    0x65, 0x75, // "eu"
    0x06, 0x00, // name_len 6
    0x4D, 0x73, 0x67, 0x2D, 0x49, 0x64, // "Msg-Id"
    0x02, 0x00, 0x00, 0x00, // value_len 2
    0x34, 0x32, // "42"
];

/// (b) Message 2 on `orders.eu` with [`HEADERS_BLOCK`], payload `ok`, at `T` + 1 ms.
const MESSAGE_WITH_HEADERS: [u8; 75] = [
    0x4B, 0x00, 0x00, 0x00, // len 75
    0xB3, 0x4E, 0xE0, 0x05, // crc 0x05E04EB3
    0x01, // kind: message
    0x00, // flags
    0x09, 0x00, // subject_len 9
    0x1C, 0x00, 0x00, 0x00, // headers_len 28
    0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // seq 2
    0x40, 0x42, 0x39, 0x36, 0xFE, 0x9C, 0x97, 0x17, // time T + 1 ms
    0xB6, 0x81, 0x37, 0xEB, // hcrc 0xEB3781B6
    0x6F, 0x72, 0x64, 0x65, 0x72, 0x73, 0x2E, 0x65, 0x75, // "orders.eu"
    0x06, 0x00, 0x52, 0x65, 0x67, 0x69, 0x6F, 0x6E, 0x02, 0x00, 0x00, 0x00, 0x65, 0x75, //
    0x06, 0x00, 0x4D, 0x73, 0x67, 0x2D, 0x49, 0x64, 0x02, 0x00, 0x00, 0x00, 0x34, 0x32, //
    0x6F, 0x6B, // payload "ok"
];

/// (c) Message 2 was removed.
const DELETE: [u8; 36] = [
    0x24, 0x00, 0x00, 0x00, // len 36
    0x73, 0xFE, 0x92, 0x20, // crc 0x2092FE73
    0x02, // kind: delete
    0x00, // flags
    0x00, 0x00, // subject_len 0
    0x00, 0x00, 0x00, 0x00, // headers_len 0
    0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // seq 2
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // time 0
    0xAF, 0x5D, 0x5A, 0x5D, // hcrc 0x5D5A5DAF
];

/// The headers block of (d): the newest message's `Msg-Id: 42`.
const MSG_ID_BLOCK: [u8; 14] = [
    0x06, 0x00, 0x4D, 0x73, 0x67, 0x2D, 0x49, 0x64, 0x02, 0x00, 0x00, 0x00, 0x34, 0x32,
];

/// (d) Every message below 3 is gone; the newest was stored at `T` + 1 ms with
/// `Msg-Id` 42.
const PURGE: [u8; 50] = [
    0x32, 0x00, 0x00, 0x00, // len 50
    0xD8, 0x59, 0x97, 0x86, // crc 0x869759D8
    0x04, // kind: purge
    0x00, // flags
    0x00, 0x00, // subject_len 0
    0x0E, 0x00, 0x00, 0x00, // headers_len 14
    0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // seq 3
    0x40, 0x42, 0x39, 0x36, 0xFE, 0x9C, 0x97, 0x17, // time T + 1 ms
    0x24, 0x30, 0x32, 0x5B, // hcrc 0x5B323024
    0x06, 0x00, 0x4D, 0x73, 0x67, 0x2D, 0x49, 0x64, 0x02, 0x00, 0x00, 0x00, 0x34, 0x32, //
];

/// (e) The configuration of `StreamConfig::new("ORDERS", ["orders.>"])`, as JSON.
const CONFIG_JSON: &str = r#"{"name":"ORDERS","subjects":["orders.>"],"fsync":"always","max_age":null,"max_bytes":null,"max_msgs":null,"max_msgs_per_subject":null,"max_msg_size":1048576,"discard":"old","duplicate_window":{"secs":120,"nanos":0},"segment_size":67108864}"#;

/// (e) The header of the configuration record at the start of segment 1; the payload
/// [`CONFIG_JSON`] follows it.
const CONFIG_HEADER: [u8; 36] = [
    0x13, 0x01, 0x00, 0x00, // len 275 = 36 + 239 bytes of JSON
    0xD8, 0xBB, 0xF3, 0x5F, // crc 0x5FF3BBD8
    0x03, // kind: config
    0x00, // flags
    0x00, 0x00, // subject_len 0
    0x00, 0x00, 0x00, 0x00, // headers_len 0
    0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // seq 1: the next message's
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // time 0
    0x93, 0x7C, 0xAB, 0xC4, // hcrc 0xC4AB7C93
];

/// (f) The `Msg-Id` 42 of message 2, stored at `T` + 1 ms, restated.
const MSG_IDS: [u8; 58] = [
    0x3A, 0x00, 0x00, 0x00, // len 58
    0x28, 0xF9, 0x41, 0xA1, // crc 0xA141F928
    0x05, // kind: message ids
    0x00, // flags
    0x00, 0x00, // subject_len 0
    0x00, 0x00, 0x00, 0x00, // headers_len 0
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // seq 0
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // time 0
    0x0F, 0x5A, 0x2E, 0x50, // hcrc 0x502E5A0F
    0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // entry: seq 2
    0x40, 0x42, 0x39, 0x36, 0xFE, 0x9C, 0x97, 0x17, // time T + 1 ms
    0x02, 0x00, 0x00, 0x00, // id_len 2
    0x34, 0x32, // "42"
];

fn config() -> StreamConfig {
    StreamConfig::new("ORDERS", ["orders.>"])
}

fn encoded(
    kind: Kind,
    seq: u64,
    time: i64,
    subject: &str,
    headers: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    let mut buf = Vec::new();
    let record = Record {
        kind,
        seq,
        time,
        subject,
        headers,
        payload,
    };
    let len = encode(&mut buf, SALT, &record);
    assert_eq!(len, buf.len(), "encode returns the record's length");
    assert_eq!(len, record::encoded_len(subject, headers, payload));
    buf
}

fn hex(bytes: &[u8]) -> String {
    let pairs: Vec<String> = bytes.iter().map(|b| format!("{b:02X}")).collect();
    pairs.join(" ")
}

/// Asserts two byte strings are equal, showing both as hex when they are not.
#[track_caller]
fn assert_bytes(found: &[u8], expected: &[u8], what: &str) {
    assert!(
        found == expected,
        "{what}:\n found    {}\n expected {}",
        hex(found),
        hex(expected)
    );
}

#[test]
fn a_message_record_without_headers_is_encoded_exactly_as_storage_md_shows() {
    let bytes = encoded(Kind::Message, 1, T, "orders.eu", &[], b"hi");
    assert_bytes(&bytes, &MESSAGE, "message (a)");

    let record = decode(&MESSAGE, SALT, LIMIT).unwrap();
    assert_eq!(
        record,
        Record {
            kind: Kind::Message,
            seq: 1,
            time: T,
            subject: "orders.eu",
            headers: &[],
            payload: b"hi",
        }
    );
    assert_eq!(record::peek_len(&MESSAGE), Some(47));
    assert!(
        record::headers(&Bytes::new(), &mut SharedNames::default())
            .unwrap()
            .is_empty()
    );
}

#[test]
fn a_headers_block_is_encoded_exactly_as_storage_md_shows() {
    let mut block = Vec::new();
    encode_headers(&mut block, [("Region", &b"eu"[..]), ("Msg-Id", &b"42"[..])]);
    assert_bytes(&block, &HEADERS_BLOCK, "headers block");

    let parsed = record::headers(
        &Bytes::from_static(&HEADERS_BLOCK),
        &mut SharedNames::default(),
    )
    .unwrap();
    assert_eq!(
        parsed,
        [
            ("Region".into(), Bytes::from_static(b"eu")),
            ("Msg-Id".into(), Bytes::from_static(b"42")),
        ]
    );
    assert_eq!(
        record::find_header(&HEADERS_BLOCK, mq_store::MSG_ID_HEADER).unwrap(),
        Some(&b"42"[..])
    );
}

#[test]
fn a_message_record_with_a_msg_id_and_another_header_is_encoded_exactly_as_storage_md_shows() {
    let bytes = encoded(
        Kind::Message,
        2,
        T + 1_000_000,
        "orders.eu",
        &HEADERS_BLOCK,
        b"ok",
    );
    assert_bytes(&bytes, &MESSAGE_WITH_HEADERS, "message (b)");

    let record = decode(&MESSAGE_WITH_HEADERS, SALT, LIMIT).unwrap();
    assert_eq!(
        record,
        Record {
            kind: Kind::Message,
            seq: 2,
            time: T + 1_000_000,
            subject: "orders.eu",
            headers: &HEADERS_BLOCK,
            payload: b"ok",
        }
    );
}

#[test]
fn a_delete_record_is_encoded_exactly_as_storage_md_shows() {
    let bytes = encoded(Kind::Delete, 2, 0, "", &[], &[]);
    assert_bytes(&bytes, &DELETE, "delete (c)");

    let record = decode(&DELETE, SALT, LIMIT).unwrap();
    assert_eq!(
        record,
        Record {
            kind: Kind::Delete,
            seq: 2,
            time: 0,
            subject: "",
            headers: &[],
            payload: &[],
        }
    );
}

#[test]
fn a_purge_record_is_encoded_exactly_as_storage_md_shows() {
    let mut block = Vec::new();
    encode_headers(&mut block, [("Msg-Id", &b"42"[..])]);
    assert_bytes(&block, &MSG_ID_BLOCK, "purge headers block");
    let bytes = encoded(Kind::Purge, 3, T + 1_000_000, "", &MSG_ID_BLOCK, &[]);
    assert_bytes(&bytes, &PURGE, "purge (d)");

    let record = decode(&PURGE, SALT, LIMIT).unwrap();
    assert_eq!(
        record,
        Record {
            kind: Kind::Purge,
            seq: 3,
            time: T + 1_000_000,
            subject: "",
            headers: &MSG_ID_BLOCK,
            payload: &[],
        }
    );
}

#[test]
fn a_segment_header_is_encoded_exactly_as_storage_md_shows() {
    let header = SegmentHeader {
        first_seq: 1,
        salt: SALT,
    };
    let mut bytes = Vec::new();
    encode_segment_header(&mut bytes, &header);
    assert_bytes(&bytes, &SEGMENT_HEADER, "segment header (s)");
    assert_eq!(decode_segment_header(&SEGMENT_HEADER), Ok(header));
}

#[test]
fn a_message_ids_record_is_encoded_exactly_as_storage_md_shows() {
    let mut payload = Vec::new();
    record::encode_msg_id(&mut payload, 2, T + 1_000_000, "42");
    let bytes = encoded(Kind::MsgIds, 0, 0, "", &[], &payload);
    assert_bytes(&bytes, &MSG_IDS, "message ids (f)");

    let record = decode(&MSG_IDS, SALT, LIMIT).unwrap();
    assert_eq!((record.kind, record.seq, record.time), (Kind::MsgIds, 0, 0));
    assert_eq!(
        record::msg_ids(record.payload).unwrap(),
        [(2, T + 1_000_000, "42")]
    );
}

#[test]
fn a_record_is_refused_under_another_segments_salt() {
    for vector in [&MESSAGE[..], &DELETE, &PURGE, &MSG_IDS] {
        assert!(decode(vector, SALT ^ 1, LIMIT).is_err());
    }
}

#[test]
fn a_config_record_is_the_header_storage_md_shows_followed_by_the_configs_json() {
    let json = serde_json::to_string(&config()).unwrap();
    assert_eq!(json, CONFIG_JSON, "a default configuration's JSON");
    assert_eq!(CONFIG_JSON.len(), 239);

    let bytes = encoded(Kind::Config, 1, 0, "", &[], CONFIG_JSON.as_bytes());
    assert_bytes(&bytes[..36], &CONFIG_HEADER, "config header (e)");
    assert_eq!(&bytes[36..], CONFIG_JSON.as_bytes());

    let record = decode(&bytes, SALT, LIMIT).unwrap();
    assert_eq!(
        (record.kind, record.seq, record.time, record.subject),
        (Kind::Config, 1, 0, "")
    );
    assert!(record.headers.is_empty());
    let parsed: StreamConfig = serde_json::from_slice(record.payload).unwrap();
    assert_eq!(parsed, config());
}

/// The bytes between the fences of the code block that follows `<!-- golden: name -->`
/// in `docs/STORAGE.md`, and the rows of the table right after it (if any).
fn golden_section(name: &str) -> (String, Vec<&'static str>) {
    let marker = format!("<!-- golden: {name} -->");
    let found: Vec<_> = STORAGE_MD.match_indices(&marker).collect();
    assert_eq!(
        found.len(),
        1,
        "STORAGE.md must have `{marker}` exactly once"
    );
    let mut lines = STORAGE_MD[found[0].0 + marker.len()..].lines();
    let fence = |line: &str| line.trim_start().starts_with("```");
    lines
        .by_ref()
        .find(|line| fence(line))
        .unwrap_or_else(|| panic!("no code block after `{marker}`"));
    let block: Vec<&str> = lines.by_ref().take_while(|line| !fence(line)).collect();
    let table = lines
        .skip_while(|line| line.trim().is_empty())
        .take_while(|line| line.trim_start().starts_with('|'))
        .collect();
    (block.join("\n"), table)
}

/// Hex byte pairs separated by white space, e.g. `2B 00  00 00`.
fn parse_hex(text: &str, what: &str) -> Vec<u8> {
    text.split_whitespace()
        .map(|token| {
            assert!(token.len() == 2, "{what}: `{token}` is not a byte in hex");
            u8::from_str_radix(token, 16)
                .unwrap_or_else(|_| panic!("{what}: `{token}` is not a byte in hex"))
        })
        .collect()
}

/// The bytes of a field table: in each row, the first cell that is a backquoted run of
/// hex bytes.
fn table_bytes(rows: &[&str]) -> Vec<u8> {
    let is_byte = |t: &str| t.len() == 2 && t.bytes().all(|b| b.is_ascii_hexdigit());
    let mut out = Vec::new();
    for row in rows {
        let cell = row.split('|').map(str::trim).find(|cell| {
            cell.len() > 2
                && cell.starts_with('`')
                && cell.ends_with('`')
                && cell[1..cell.len() - 1].split_whitespace().all(is_byte)
        });
        if let Some(cell) = cell {
            out.extend(parse_hex(&cell[1..cell.len() - 1], row));
        }
    }
    out
}

#[test]
fn storage_md_shows_the_same_bytes_as_this_test() {
    let vectors: [(&str, &[u8]); 8] = [
        ("segment-header", &SEGMENT_HEADER),
        ("message", &MESSAGE),
        ("headers-block", &HEADERS_BLOCK),
        ("message-with-headers", &MESSAGE_WITH_HEADERS),
        ("delete", &DELETE),
        ("purge", &PURGE),
        ("config-header", &CONFIG_HEADER),
        ("msg-ids", &MSG_IDS),
    ];
    for (name, expected) in vectors {
        let (block, table) = golden_section(name);
        let dumped = parse_hex(&block, name);
        assert_bytes(&dumped, expected, &format!("STORAGE.md hex dump `{name}`"));
        let tabled = table_bytes(&table);
        assert_bytes(
            &tabled,
            expected,
            &format!("STORAGE.md field table `{name}`"),
        );
    }
    let (json, _) = golden_section("config-json");
    assert_eq!(json.trim(), CONFIG_JSON, "STORAGE.md configuration JSON");
}

#[tokio::test]
async fn a_stream_writes_exactly_these_records_into_its_first_segment() {
    let fs = SimFs::default();
    let clock = ManualClock::new(T);
    let store = Store::open_with(
        Arc::new(fs.clone()),
        Path::new("/golden"),
        Arc::new(clock.clone()),
    )
    .unwrap();
    let stream = store.create(config()).unwrap();

    let ack = stream
        .publish("orders.eu", &[], b"hi", &Publish::default())
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(ack.seq, 1);
    clock.advance(Duration::from_millis(1));
    // The Msg-Id goes last in the headers block, whichever way it is given.
    let with_id = Publish {
        msg_id: Some("42".into()),
        ..Publish::default()
    };
    let ack = stream
        .publish("orders.eu", &[("Region", b"eu")], b"ok", &with_id)
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(ack.seq, 2);
    assert!(stream.delete_message(2).await.unwrap(), "a delete record");
    assert!(
        stream.delete_message(1).await.unwrap(),
        "the first: a purge"
    );

    let path = Path::new("/golden/streams/ORDERS/00000000000000000001.log");
    let file = fs.open(path, false).unwrap();
    let mut written = vec![0; file.len().unwrap() as usize];
    file.read_exact_at(&mut written, 0).unwrap();
    // The segment drew its own salt: the vectors' checksums are recomputed with it,
    // every other byte is as shown.
    let header = decode_segment_header(&written).unwrap();
    assert_eq!(header.first_seq, 1);
    let mut expected = Vec::new();
    encode_segment_header(&mut expected, &header);
    assert_bytes(&expected[..20], &SEGMENT_HEADER[..20], "segment header (s)");
    for vector in [
        [&CONFIG_HEADER[..], CONFIG_JSON.as_bytes()].concat(),
        MESSAGE.to_vec(),
        MESSAGE_WITH_HEADERS.to_vec(),
        DELETE.to_vec(),
        PURGE.to_vec(),
    ] {
        let record = decode(&vector, SALT, LIMIT).unwrap();
        let at = expected.len();
        encode(&mut expected, header.salt, &record);
        assert_bytes(&expected[at..][8..32], &vector[8..32], "a record's header");
        assert_bytes(&expected[at..][36..], &vector[36..], "a record's body");
    }
    assert_eq!(expected.len(), 32 + 275 + 47 + 75 + 36 + 50);
    assert_bytes(&written, &expected, "segment 1");
    drop((stream, store));

    // Read back, the file says: nothing stored, sequences go on at 3.
    let store = Store::open_with(
        Arc::new(fs.clone()),
        Path::new("/golden"),
        Arc::new(clock.clone()),
    )
    .unwrap();
    let stream = store.stream("ORDERS").unwrap();
    let state = stream.info().state;
    assert_eq!((state.msgs, state.first_seq, state.last_seq), (0, 3, 2));
    let ack = stream
        .publish("orders.eu", &[], b"next", &Publish::default())
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(ack.seq, 3);
}
