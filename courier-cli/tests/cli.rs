//! The `courier` binary end to end: a broker, pub/sub, request/reply, and errors.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};

fn courier() -> Command {
    Command::new(env!("CARGO_BIN_EXE_courier"))
}

/// A child killed when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `courier broker` on a free port; returns it and its address.
fn broker() -> (Running, String) {
    let mut child = courier()
        .args(["broker", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("courier broker starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .split_whitespace()
        .last()
        .expect("an address")
        .to_owned();
    (Running(child), addr)
}

/// Starts `courier <args>` and waits until it says on stderr that it is listening.
fn listening(args: &[&str]) -> (Running, BufReader<std::process::ChildStdout>) {
    let mut child = courier()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("courier starts");
    let mut line = String::new();
    BufReader::new(child.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(
        line.contains("listening") || line.contains("echoing"),
        "unexpected first line: {line}"
    );
    let stdout = BufReader::new(child.stdout.take().unwrap());
    (Running(child), stdout)
}

fn run(args: &[&str]) -> Output {
    courier().args(args).output().expect("courier runs")
}

#[test]
fn a_published_message_reaches_a_subscriber_with_its_headers() {
    let (_broker, addr) = broker();
    let (sub, mut out) = listening(&["sub", "orders.*", "--count", "1", "-s", &addr]);
    let published = run(&[
        "pub",
        "orders.created",
        "order 42",
        "-H",
        "Trace-Id:abc",
        "-s",
        &addr,
    ]);
    assert!(published.status.success(), "{published:?}");
    let mut lines = Vec::new();
    for _ in 0..3 {
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        lines.push(line.trim_end().to_owned());
    }
    assert_eq!(lines[0], "[#1] orders.created (8 bytes)");
    assert_eq!(lines[1], "Trace-Id: abc");
    assert_eq!(lines[2], "order 42");
    drop(sub);
}

#[test]
fn a_request_is_answered_by_the_echo_responder() {
    let (_broker, addr) = broker();
    let (_reply, _) = listening(&["reply", "time.now", "-s", &addr]);
    let answer = run(&["req", "time.now", "ping", "-s", &addr]);
    assert!(answer.status.success(), "{answer:?}");
    let stdout = String::from_utf8_lossy(&answer.stdout);
    assert!(stdout.lines().any(|l| l == "ping"), "{stdout}");
}

#[test]
fn errors_are_one_line_and_a_failing_exit_status() {
    let (_broker, addr) = broker();
    let nobody = run(&["req", "nobody.home", "x", "-s", &addr]);
    assert!(!nobody.status.success());
    let stderr = String::from_utf8_lossy(&nobody.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("courier: error: no responders"),
        "{stderr}"
    );

    let bad = run(&["pub", "orders.*", "x", "-s", &addr]);
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("orders.*"), "{stderr}");

    // Nothing listens on port 1.
    let unreachable = run(&["pub", "a", "x", "-s", "127.0.0.1:1"]);
    assert!(!unreachable.status.success());
    let stderr = String::from_utf8_lossy(&unreachable.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("courier: error: could not connect"),
        "{stderr}"
    );
}

/// `courier bench bus <args> --json`, which must succeed: its rows.
fn bench_bus_json(args: &[&str]) -> Vec<serde_json::Value> {
    let mut all = vec!["bench", "bus"];
    all.extend_from_slice(args);
    all.push("--json");
    let out = run(&all);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON row"))
        .collect()
}

#[test]
fn bench_bus_reports_the_brokers_memory_per_idle_connection_and_per_subscription() {
    let rows = bench_bus_json(&[
        "--only",
        "mem_idle_conns,mem_subs",
        "--mem-conns",
        "200",
        "--mem-subs",
        "5000",
    ]);
    for (scenario, count) in [("mem_idle_conns", 200), ("mem_subs", 5000)] {
        let row = rows
            .iter()
            .find(|r| r["scenario"] == scenario)
            .unwrap_or_else(|| panic!("no {scenario} row in {rows:?}"));
        println!("{row}");
        assert_eq!(row["count"], count, "{row}");
        let (before, after) = (
            row["broker_rss_before_kib"].as_u64().expect("RSS before"),
            row["broker_rss_after_kib"].as_u64().expect("RSS after"),
        );
        assert!(after > before, "the broker's memory grew: {row}");
        let per = row["broker_bytes_per"].as_f64().expect("bytes per");
        assert_eq!(
            per,
            ((after - before) as f64 * 1024.0 / count as f64).round(),
            "{row}"
        );
    }
}

#[test]
fn bench_bus_calls_a_service_over_the_broker_with_many_calls_in_flight() {
    let rows = bench_bus_json(&[
        "--only",
        "rpc_over_bus",
        "--duration-s",
        "0.3",
        "--warmup-s",
        "0.1",
    ]);
    assert_eq!(rows.len(), 1, "{rows:?}");
    let row = &rows[0];
    println!("{row}");
    assert_eq!(row["scenario"], "rpc_over_bus");
    assert_eq!(row["in_flight"], 64);
    assert!(row["requests"].as_u64().expect("requests") > 0, "{row}");
    assert!(row["req_per_s"].as_f64().expect("a rate") > 0.0, "{row}");
}
