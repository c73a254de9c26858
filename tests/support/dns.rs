//! An in-process DNS server for tests, on 127.0.0.1 (UDP and TCP on the same ephemeral
//! port), answering from a table the test builds: MX records (null MX included), A,
//! AAAA and TXT records, NXDOMAIN and SERVFAIL names, and names never answered (the
//! client times out). Any name not in the table is NXDOMAIN; a
//! known name without records of the asked type gets an empty NOERROR (NODATA).
//!
//! Use it from an integration test with
//! `#[path = "support/dns.rs"] mod dns;` and point the router at it:
//!
//! ```ignore
//! let zone = dns::Zone::new()
//!     .mx("example.test", 10, "mx1.example.test")
//!     .a("mx1.example.test", "127.0.0.1".parse().unwrap())
//!     .null_mx("nullmx.test")
//!     .nxdomain("gone.test");
//! let dns = dns::DnsServer::start(zone).await;
//! config.dns_nameservers = vec![dns.addr()];
//! ```
//!
//! The server runs until the `DnsServer` is dropped. It answers with hickory-proto's
//! message codec directly (no hickory-server catalog needed).

#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use hickory_resolver::proto::op::{Message, MessageType, ResponseCode};
use hickory_resolver::proto::rr::rdata::{A, AAAA, MX, TXT};
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::task::JoinHandle;

/// The records the server answers from. Names are case-insensitive, with or without
/// the trailing dot.
#[derive(Debug, Clone, Default)]
pub struct Zone {
    mx: HashMap<String, Vec<(u16, String)>>,
    a: HashMap<String, Vec<Ipv4Addr>>,
    aaaa: HashMap<String, Vec<Ipv6Addr>>,
    nxdomain: HashSet<String>,
    servfail: HashSet<String>,
    txt: HashMap<String, Vec<String>>,
    silent: HashSet<String>,
    /// Names that exist (have some record) but may have none of the asked type.
    exists: HashSet<String>,
}

fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl Zone {
    /// An empty zone: every name is NXDOMAIN.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes `name` exist and adds `record` to its list in `table` (in the order added).
    fn add<T>(
        mut self, name: &str, table: impl FnOnce(&mut Self) -> &mut HashMap<String, Vec<T>>,
        record: T,
    ) -> Self {
        self.exists.insert(key(name));
        table(&mut self).entry(key(name)).or_default().push(record);
        self
    }

    /// Puts `name` in the set `set`.
    fn mark(mut self, name: &str, set: impl FnOnce(&mut Self) -> &mut HashSet<String>) -> Self {
        set(&mut self).insert(key(name));
        self
    }

    /// Adds `MX preference exchange` to `domain` (records keep the order added).
    pub fn mx(self, domain: &str, preference: u16, exchange: &str) -> Self {
        self.add(domain, |z| &mut z.mx, (preference, key(exchange)))
    }

    /// Gives `domain` a null MX (`MX 0 .`, RFC 7505).
    pub fn null_mx(self, domain: &str) -> Self {
        self.mx(domain, 0, ".")
    }

    /// Adds an A record.
    pub fn a(self, name: &str, ip: Ipv4Addr) -> Self {
        self.add(name, |z| &mut z.a, ip)
    }

    /// Adds an AAAA record.
    pub fn aaaa(self, name: &str, ip: Ipv6Addr) -> Self {
        self.add(name, |z| &mut z.aaaa, ip)
    }

    /// Makes `name` exist with no records at all (every query gets NODATA).
    pub fn empty(self, name: &str) -> Self {
        self.mark(name, |z| &mut z.exists)
    }

    /// Answers NXDOMAIN for `name` (also the default for unknown names; this makes the
    /// intent explicit and overrides records).
    pub fn nxdomain(self, name: &str) -> Self {
        self.mark(name, |z| &mut z.nxdomain)
    }

    /// Adds a TXT record to `name`; text longer than 255 octets is split into strings
    /// of 255, as a zone file would hold it.
    pub fn txt(self, name: &str, text: &str) -> Self {
        self.add(name, |z| &mut z.txt, text.to_string())
    }

    /// Never answers questions about `name`: the resolver times out.
    pub fn silent(self, name: &str) -> Self {
        self.mark(name, |z| &mut z.silent)
    }

    /// Answers SERVFAIL for `name` (a temporary DNS failure).
    pub fn servfail(self, name: &str) -> Self {
        self.mark(name, |z| &mut z.servfail)
    }

    /// The response code and answer records for one question.
    fn answer(&self, qname: &Name, qtype: RecordType) -> (ResponseCode, Vec<Record>) {
        let k = key(&qname.to_ascii());
        if self.servfail.contains(&k) {
            return (ResponseCode::ServFail, Vec::new());
        }
        if self.nxdomain.contains(&k) || !self.exists.contains(&k) {
            return (ResponseCode::NXDomain, Vec::new());
        }
        let name = qname.clone();
        let records = match qtype {
            RecordType::MX => self
                .mx
                .get(&k)
                .into_iter()
                .flatten()
                .map(|(pref, ex)| {
                    let exchange = if ex == "." || ex.is_empty() {
                        Name::root()
                    } else {
                        Name::from_ascii(format!("{ex}.")).expect("valid exchange name")
                    };
                    Record::from_rdata(name.clone(), 60, RData::MX(MX::new(*pref, exchange)))
                })
                .collect(),
            RecordType::A => self
                .a
                .get(&k)
                .into_iter()
                .flatten()
                .map(|ip| Record::from_rdata(name.clone(), 60, RData::A(A(*ip))))
                .collect(),
            RecordType::AAAA => self
                .aaaa
                .get(&k)
                .into_iter()
                .flatten()
                .map(|ip| Record::from_rdata(name.clone(), 60, RData::AAAA(AAAA(*ip))))
                .collect(),
            RecordType::TXT => self
                .txt
                .get(&k)
                .into_iter()
                .flatten()
                .map(|text| {
                    let parts: Vec<String> = text
                        .as_bytes()
                        .chunks(255)
                        .map(|c| String::from_utf8_lossy(c).into_owned())
                        .collect();
                    Record::from_rdata(name.clone(), 60, RData::TXT(TXT::new(parts)))
                })
                .collect(),
            _ => Vec::new(),
        };
        (ResponseCode::NoError, records)
    }

    /// The wire response to a wire query; None for garbage.
    fn respond(&self, query: &[u8]) -> Option<Vec<u8>> {
        let req = Message::from_vec(query).ok()?;
        if req.metadata.message_type != MessageType::Query {
            return None;
        }
        let mut resp = Message::response(req.metadata.id, req.metadata.op_code);
        resp.metadata.recursion_desired = req.metadata.recursion_desired;
        resp.metadata.recursion_available = true;
        resp.metadata.authoritative = true;
        if req
            .queries
            .iter()
            .any(|q| self.silent.contains(&key(&q.name().to_ascii())))
        {
            return None;
        }
        let mut code = ResponseCode::NoError;
        for q in &req.queries {
            let (c, records) = self.answer(q.name(), q.query_type());
            code = c;
            resp.add_answers(records);
        }
        resp.metadata.response_code = code;
        resp.add_queries(req.queries.clone());
        resp.to_vec().ok()
    }
}

/// A running test DNS server.
pub struct DnsServer {
    addr: SocketAddr,
    zone: Arc<Mutex<Zone>>,
    queries: Arc<Mutex<Vec<(String, RecordType)>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl DnsServer {
    /// Starts answering from `zone` on 127.0.0.1, UDP and TCP on one ephemeral port.
    pub async fn start(zone: Zone) -> DnsServer {
        // Find a port free for both protocols.
        let (udp, tcp) = loop {
            let udp = UdpSocket::bind("127.0.0.1:0").await.expect("bind UDP");
            let port = udp.local_addr().unwrap().port();
            if let Ok(tcp) = TcpListener::bind(("127.0.0.1", port)).await {
                break (udp, tcp);
            }
        };
        let addr = udp.local_addr().unwrap();
        let zone = Arc::new(Mutex::new(zone));
        let queries = Arc::new(Mutex::new(Vec::new()));

        let (z, log) = (zone.clone(), queries.clone());
        let udp_task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, peer)) = udp.recv_from(&mut buf).await else {
                    return;
                };
                record(&log, &buf[..n]);
                let resp = z.lock().unwrap().respond(&buf[..n]);
                if let Some(resp) = resp {
                    let _ = udp.send_to(&resp, peer).await;
                }
            }
        });

        let (z, log) = (zone.clone(), queries.clone());
        let tcp_task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = tcp.accept().await else {
                    return;
                };
                let (z, log) = (z.clone(), log.clone());
                tokio::spawn(async move {
                    loop {
                        let Ok(len) = stream.read_u16().await else {
                            return;
                        };
                        let mut msg = vec![0u8; len as usize];
                        if stream.read_exact(&mut msg).await.is_err() {
                            return;
                        }
                        record(&log, &msg);
                        let resp = z.lock().unwrap().respond(&msg);
                        let Some(resp) = resp else { return };
                        let mut out = (resp.len() as u16).to_be_bytes().to_vec();
                        out.extend_from_slice(&resp);
                        if stream.write_all(&out).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });

        DnsServer {
            addr,
            zone,
            queries,
            tasks: vec![udp_task, tcp_task],
        }
    }

    /// The server's address, for `dns_nameservers`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Replaces the table (later queries see the new records).
    pub fn set_zone(&self, zone: Zone) {
        *self.zone.lock().unwrap() = zone;
    }

    /// Every question asked so far: (name without trailing dot, type).
    pub fn queries(&self) -> Vec<(String, RecordType)> {
        self.queries.lock().unwrap().clone()
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn record(log: &Mutex<Vec<(String, RecordType)>>, query: &[u8]) {
    if let Ok(m) = Message::from_vec(query) {
        let mut log = log.lock().unwrap();
        for q in &m.queries {
            log.push((key(&q.name().to_ascii()), q.query_type()));
        }
    }
}
