//! `smtpd_fsm#<n>`: placeholder until the session machine lands.
use std::net::SocketAddr;
use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::net::TcpStream;

use crate::config::Config;

/// The session actor.
pub struct Fsm;
/// Start-up arguments.
pub struct FsmArgs {
    /// The accepted connection.
    pub stream: TcpStream,
    /// The client's address.
    pub peer: SocketAddr,
    /// The configuration in force.
    pub config: Arc<Config>,
    /// Path in the tree.
    pub path: String,
}
/// Messages.
pub enum FsmMsg {
    /// Stop.
    Shutdown,
}
impl Actor for Fsm {
    type Msg = FsmMsg;
    type State = ();
    type Arguments = FsmArgs;
    async fn pre_start(&self, myself: ActorRef<FsmMsg>, args: FsmArgs) -> Result<(), ActorProcessingErr> {
        use tokio::io::AsyncWriteExt;
        let mut s = args.stream;
        let _ = s.write_all(format!("421 4.3.2 {} Service not available\r\n", args.config.server_smtp_name).as_bytes()).await;
        myself.stop(None);
        Ok(())
    }
}
