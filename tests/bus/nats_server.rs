//! nats-server processes for the tests: started on free loopback ports, stopped by their
//! process id. Without nats-server installed the tests fail, saying how to install it.

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One running nats-server; killed when dropped.
pub(crate) struct NatsServer {
    child: Option<Child>,
    pub(crate) port: u16,
    cluster_port: Option<u16>,
    routes: Vec<String>,
}

impl NatsServer {
    /// A standalone server.
    pub(crate) fn start() -> NatsServer {
        NatsServer::spawn(free_port(), None, &[])
    }

    /// `n` servers joined in one cluster by routes on loopback.
    pub(crate) fn cluster(n: usize) -> Vec<NatsServer> {
        let cluster_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let routes: Vec<String> = cluster_ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect();
        let servers: Vec<NatsServer> = cluster_ports
            .iter()
            .map(|&cp| {
                let others: Vec<String> = routes
                    .iter()
                    .filter(|r| !r.ends_with(&format!(":{cp}")))
                    .cloned()
                    .collect();
                NatsServer::spawn(free_port(), Some(cp), &others)
            })
            .collect();
        servers
    }

    fn spawn(port: u16, cluster_port: Option<u16>, routes: &[String]) -> NatsServer {
        let mut command = Command::new("nats-server");
        command
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(cp) = cluster_port {
            command.args([
                "--cluster_name",
                "courier-test",
                "--cluster",
                &format!("nats://127.0.0.1:{cp}"),
            ]);
            if !routes.is_empty() {
                command.args(["--routes", &routes.join(",")]);
            }
        }
        let child = command.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot start nats-server ({e}). The NATS tests (cargo feature `nats`) need \
                 it: `apt-get install -y nats-server` (Debian), or put a nats-server binary \
                 on PATH. Without the feature these tests are not built."
            )
        });
        let server = NatsServer {
            child: Some(child),
            port,
            cluster_port,
            routes: routes.to_vec(),
        };
        server.wait_until_listening();
        server
    }

    fn wait_until_listening(&self) {
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        let started = Instant::now();
        while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "nats-server did not listen on {addr} within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A new process with the same ports and routes (after [`NatsServer::kill`]).
    pub(crate) fn restart(old: &NatsServer) -> NatsServer {
        NatsServer::spawn(old.port, old.cluster_port, &old.routes)
    }

    /// `nats://127.0.0.1:<port>`.
    pub(crate) fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL, by its process id) and waits for it to exit.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}
