//! Kill -9 with a real process: every acknowledged message survives.
//!
//! The test binary runs itself as a child process that publishes to a stream with
//! `fsync = always`, 64 publishes in flight, printing each acknowledged sequence and
//! payload. The parent kills it with SIGKILL mid-run, reopens the store, and checks
//! that every acknowledged message is there with identical bytes; then it does it
//! again on the same directory, several times.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use mq_store::{Publish, Store, StreamConfig};

const CHILD: &str = "MQ_STORE_KILL9_CHILD";
const CYCLES: usize = 5;

fn config() -> StreamConfig {
    StreamConfig {
        segment_size: 256 * 1024,
        ..StreamConfig::new("KILL9", ["kill9.*"])
    }
}

fn payload(cycle: &str, i: u64) -> String {
    format!("{cycle}/{i}/{}", "x".repeat((i % 200) as usize))
}

/// The child: publish until killed, printing `seq payload` per acknowledgement.
async fn child(dir: &Path, cycle: &str) {
    let store = Store::open(dir).expect("open the store");
    let stream = match store.stream("KILL9") {
        Ok(stream) => stream,
        Err(_) => store.create(config()).expect("create the stream"),
    };
    let mut in_flight = std::collections::VecDeque::new();
    let mut out = std::io::stdout().lock();
    for i in 0.. {
        let body = payload(cycle, i);
        let ack = stream
            .publish(
                &format!("kill9.{}", i % 7),
                &[],
                body.as_bytes(),
                &Publish::default(),
            )
            .await
            .expect("publish");
        in_flight.push_back((body, ack));
        if in_flight.len() >= 64 {
            let (body, ack) = in_flight.pop_front().expect("64 in flight");
            let seq = ack.await.expect("acknowledged").seq;
            use std::io::Write;
            writeln!(out, "{seq} {body}").expect("stdout");
            out.flush().expect("stdout");
        }
    }
}

fn main() {
    if let Ok(args) = std::env::var(CHILD) {
        let (dir, cycle) = args.split_once('|').expect("dir|cycle");
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime")
            .block_on(child(Path::new(dir), cycle));
        return;
    }
    if std::env::args().any(|a| a == "--list") {
        println!("acknowledged_messages_survive_kill_9: test");
        return;
    }
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut acknowledged: Vec<(u64, String)> = Vec::new();
    for cycle in 0..CYCLES {
        let mut child = Command::new(std::env::current_exe().expect("this test's path"))
            .env(CHILD, format!("{}|c{cycle}", dir.path().display()))
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn the publisher");
        let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
        let kill_after = 400 + cycle * 373;
        let mut read = 0;
        while read < kill_after {
            let line = lines
                .next()
                .expect("the child publishes until killed")
                .expect("utf-8");
            let (seq, body) = line.split_once(' ').expect("seq payload");
            acknowledged.push((seq.parse().expect("a sequence"), body.to_owned()));
            read += 1;
        }
        child.kill().expect("SIGKILL"); // std sends SIGKILL on Unix
        child.wait().expect("reaped");
        // Acknowledgements printed before the kill count too.
        for line in lines {
            let line = line.expect("utf-8");
            if let Some((seq, body)) = line.split_once(' ')
                && let Ok(seq) = seq.parse()
            {
                acknowledged.push((seq, body.to_owned()));
            }
        }

        let store = Store::open(dir.path()).expect("reopen after kill -9");
        let stream = store.stream("KILL9").expect("the stream survives");
        let stored = stream.range(1, usize::MAX, usize::MAX).expect("read back");
        let lost = acknowledged
            .iter()
            .filter(|(seq, body)| {
                stored
                    .binary_search_by_key(seq, |m| m.seq)
                    .map_or(true, |i| stored[i].payload != body.as_bytes())
            })
            .count();
        println!(
            "cycle {cycle}: acknowledged {} (in all cycles), stored {}, acknowledged but lost: {lost}",
            acknowledged.len(),
            stored.len()
        );
        assert_eq!(lost, 0, "acknowledged messages were lost");
    }
    println!("test acknowledged_messages_survive_kill_9 ... ok");
}
