//! A service on a three-node NATS cluster on loopback: calls cross the cluster's routes
//! and survive the loss of a node (cargo feature `nats`; needs nats-server).
#![cfg(feature = "nats")]

mod bus;

use std::time::{Duration, Instant};

use bus::nats_server::NatsServer;
use courier::RpcError;
use courier::bus::{Bus, NatsOptions, nats::async_nats};

#[courier::service]
trait Who {
    /// Which instance answered.
    async fn who(&self) -> String;
}

struct Instance(&'static str);

impl Who for Instance {
    async fn who(&self) -> String {
        self.0.to_owned()
    }
}

/// A bus connected to `server` only: when that node dies, so does everything on it.
async fn pinned_to(server: &NatsServer) -> Bus {
    let mut options = NatsOptions::default();
    options.connect = async_nats::ConnectOptions::new().ignore_discovered_servers();
    Bus::connect_nats_with(&server.url(), options)
        .await
        .expect("connects to its node")
}

/// `n` calls, each with a 5 s deadline; who answered each.
async fn calls(client: &WhoClient, n: usize) -> Vec<String> {
    let mut answers = Vec::with_capacity(n);
    for i in 0..n {
        let started = Instant::now();
        let answer = client
            .who()
            .await
            .unwrap_or_else(|e| panic!("call {i} failed after {:?}: {e}", started.elapsed()));
        answers.push(answer);
    }
    answers
}

#[tokio::test]
async fn a_service_keeps_answering_across_a_three_node_cluster_as_nodes_die() {
    let mut nodes = NatsServer::cluster(3);
    let (a, c) = (&nodes[0], &nodes[2]);

    // The service on node A, the client on node C: calls cross the route A–C. The first
    // calls retry on "no responders" until the routes have carried the interest over.
    let on_a = pinned_to(a).await;
    let _instance_a = on_a.serve(Instance("on A").into_service()).await.unwrap();
    let client =
        WhoClient::new(pinned_to(c).await.rpc_client()).with_timeout(Duration::from_secs(5));
    assert!(calls(&client, 20).await.iter().all(|w| w == "on A"));

    // Node B dies: A and C still talk directly.
    nodes[1].kill();
    assert!(calls(&client, 20).await.iter().all(|w| w == "on A"));

    // B comes back with a second instance; then A, with the first instance, dies.
    nodes[1] = NatsServer::restart(&nodes[1]);
    let on_b = pinned_to(&nodes[1]).await;
    let _instance_b = on_b.serve(Instance("on B").into_service()).await.unwrap();
    wait_until_both_answer(&client).await;

    // A call that C routed to A just before A died is lost with A: it fails at its
    // deadline and is not resent (it may have run). Calls made once C has dropped A's
    // interest go to B's instance.
    nodes[0].kill();
    let killed = Instant::now();
    let short = client.clone().with_timeout(Duration::from_millis(500));
    let mut lost = 0;
    loop {
        match short.who().await {
            Ok(who) => {
                assert_eq!(who, "on B");
                break;
            }
            Err(RpcError::Timeout { .. }) if killed.elapsed() < Duration::from_secs(10) => {
                lost += 1
            }
            Err(e) => panic!("after A died: {e}"),
        }
    }
    let failover = killed.elapsed();
    let answers = calls(&client, 20).await;
    assert!(
        answers.iter().all(|w| w == "on B"),
        "after A died, B's instance answers: {answers:?}"
    );
    eprintln!(
        "failover: B's instance answered {failover:?} after A was killed ({lost} call(s) lost in flight)"
    );
}

/// Calls until both instances have answered: B's interest has reached C.
async fn wait_until_both_answer(client: &WhoClient) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = std::collections::HashSet::new();
    while seen.len() < 2 {
        assert!(
            Instant::now() < deadline,
            "only {seen:?} answered within 10 s"
        );
        seen.insert(client.who().await.expect("call succeeds"));
    }
}
