//! One transport per node, its events routed to the volume drivers.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tandem_repl_proto::{ClusterSecret, NodeId};
use tandem_transport::{Event, Limits, Timers, Transport, TransportConfig};

use crate::VolumeError;
use crate::driver::{Inbox, Input};

/// Identity and listener of this node's replication endpoint.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub cluster_id: String,
    pub secret: ClusterSecret,
    pub node_id: NodeId,
    pub node_name: String,
    /// Replication listen address (port 0: any free port, see [`NodeReplication::local_addr`]).
    pub listen: SocketAddr,
    /// Transport timers (defaults suit a LAN).
    pub timers: Timers,
    /// Transport queue sizes (tests make them small to exercise back-pressure).
    pub limits: Limits,
}

/// Transport events the router takes at once at most.
const ROUTE_BATCH: usize = 256;

pub(crate) type Routes = Arc<Mutex<HashMap<String, Arc<Inbox>>>>;

/// The replication endpoint of one node (one per agent): owns the transport, routes its
/// events to the [`crate::VolumeDriver`]s by volume name. Events of a volume without a driver
/// are dropped (the transport only connects volumes a driver configured).
pub struct NodeReplication {
    pub(crate) transport: Arc<Transport>,
    pub(crate) routes: Routes,
    pub(crate) runtime: tokio::runtime::Handle,
    pub(crate) node_id: NodeId,
    pub(crate) node_name: String,
    router: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for NodeReplication {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeReplication")
            .field("node_id", &self.node_id)
            .field("local_addr", &self.transport.local_addr())
            .finish_non_exhaustive()
    }
}

impl NodeReplication {
    /// Binds the replication listener and starts routing. Must be called inside a tokio
    /// runtime (multi-threaded); the drivers send through it from their own threads.
    pub async fn start(cfg: NodeConfig) -> Result<Arc<NodeReplication>, VolumeError> {
        Self::start_inner(cfg, None).await
    }

    /// Like [`NodeReplication::start`] on a listener the caller already bound (`cfg.listen`
    /// is then only used in messages).
    pub async fn start_with_listener(
        cfg: NodeConfig,
        listener: std::net::TcpListener,
    ) -> Result<Arc<NodeReplication>, VolumeError> {
        Self::start_inner(cfg, Some(listener)).await
    }

    async fn start_inner(
        cfg: NodeConfig,
        listener: Option<std::net::TcpListener>,
    ) -> Result<Arc<NodeReplication>, VolumeError> {
        let mut tc = TransportConfig::new(
            cfg.cluster_id,
            cfg.secret,
            cfg.node_id,
            cfg.node_name.clone(),
            cfg.listen,
        );
        tc.timers = cfg.timers;
        tc.limits = cfg.limits;
        let started = match listener {
            Some(l) => Transport::start_with_listener(tc, l),
            None => Transport::start(tc).await,
        };
        let (transport, mut rx) = started.map_err(|e| VolumeError::Transport(e.to_string()))?;
        let routes: Routes = Arc::default();
        let r = routes.clone();
        let router = tokio::spawn(async move {
            // Every event already queued is taken at once and each volume's run of them is
            // run in one drain of its loop, so the messages that answer them (a
            // Secondary's WriteAcks) leave together.
            let mut events = Vec::with_capacity(ROUTE_BATCH);
            let mut runs: Vec<(Arc<Inbox>, Vec<Input>)> = Vec::new();
            while rx.recv_many(&mut events, ROUTE_BATCH).await > 0 {
                {
                    let routes = r.lock().expect("routes lock");
                    for ev in events.drain(..) {
                        let vol = match &ev {
                            Event::PeerUp { volume, .. }
                            | Event::PeerMessage { volume, .. }
                            | Event::PeerDown { volume, .. } => volume,
                        };
                        let Some(inbox) = routes.get(&**vol) else {
                            tracing::debug!(volume = %vol, "event for a volume without driver");
                            continue;
                        };
                        match runs.iter_mut().find(|(i, _)| Arc::ptr_eq(i, inbox)) {
                            Some((_, run)) => run.push(Input::Transport(ev)),
                            None => runs.push((inbox.clone(), vec![Input::Transport(ev)])),
                        }
                    }
                }
                for (inbox, run) in runs.drain(..) {
                    // A stopped volume's transport events are dropped.
                    let _ = inbox.send_many(run);
                }
            }
        });
        Ok(Arc::new(NodeReplication {
            transport: Arc::new(transport),
            routes,
            runtime: tokio::runtime::Handle::current(),
            node_id: cfg.node_id,
            node_name: cfg.node_name,
            router,
        }))
    }

    /// The bound replication address.
    pub fn local_addr(&self) -> SocketAddr {
        self.transport.local_addr()
    }

    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// The transport (links, stats).
    pub fn transport(&self) -> &Arc<Transport> {
        &self.transport
    }

    /// Closes every link in order (peers see `Disconnect{Shutdown}`) and stops routing. Stop
    /// the volume drivers first.
    pub async fn shutdown(&self) {
        self.transport.shutdown().await;
        self.router.abort();
    }
}

impl Drop for NodeReplication {
    fn drop(&mut self) {
        self.router.abort();
    }
}
