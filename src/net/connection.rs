//! One SMTP server connection: reads under a deadline, writes under a time limit, the
//! STARTTLS swap, and the 421 for a connection that is refused. No SMTP grammar here.
//!
//! A reader task owns the read half of the socket and hands each chunk to the session
//! through an [`InputSink`]; it reads the next chunk only when the session says so
//! ([`Connection::read_more`]), so a client that floods us while a commit is in flight
//! cannot grow our memory. Every read runs against a deadline that the session sets, not
//! an idle timer that each byte restarts: a client that trickles one byte every few
//! seconds still meets its deadline ([`Deadlines`] says how the deadline moves). The
//! deadline can be shortened while a read is pending (stress mode), and the reader
//! notices at once.
//!
//! STARTTLS: the reader is idle between chunks (it waits for permission), so
//! [`Connection::start_tls`] stops it, takes the read half back, joins it with the write
//! half and runs the handshake on the plain socket. Whatever the client pipelined after
//! STARTTLS is either already discarded by the session or still unread in the socket,
//! where it breaks the handshake rather than run as a command.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

/// The server side of a TLS connection.
pub type TlsIo = tokio_rustls::server::TlsStream<TcpStream>;

/// What the reader hands to the session.
#[derive(Debug)]
pub enum Input {
    /// Bytes from the client.
    Bytes(Vec<u8>),
    /// The client closed its side, or reading failed.
    Eof,
    /// The read deadline passed.
    Timeout,
}

/// Where the reader delivers [`Input`]; `false` means nobody listens any more and the
/// reader stops. The session actor passes a closure that sends itself a message, so this
/// module needs no actor types.
pub type InputSink = Arc<dyn Fn(Input) -> bool + Send + Sync>;

/// How a session's read deadline moves (Postfix's `smtpd_per_request_deadline` with
/// `smtpd_min_data_rate`). Pure: the clock comes in as `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    /// `server_smtp_timeout`, or the stress-mode value.
    pub timeout: Duration,
    /// `server_smtp_min_data_rate` in bytes per second; 0: none.
    pub min_data_rate: u64,
}

/// Where the session stands after a chunk of input, for [`Deadlines::next`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for a new command line (nothing partial buffered): a fresh deadline.
    NewCommand,
    /// Part of a command line is buffered: the deadline stays where it was, so the whole
    /// line must arrive in time however the bytes trickle in.
    PartialCommand,
    /// DATA just began (354 sent): a fresh deadline.
    DataStart,
    /// Inside DATA, `bytes` more arrived: the deadline moves later by
    /// `bytes / min_data_rate`, but never beyond `timeout` from now.
    Data {
        /// Octets read in this chunk.
        bytes: usize,
    },
}

impl Deadlines {
    /// The next read deadline, given the previous one.
    pub fn next(&self, previous: Instant, now: Instant, phase: Phase) -> Instant {
        let fresh = now + self.timeout;
        match phase {
            Phase::NewCommand | Phase::DataStart => fresh,
            Phase::PartialCommand => previous.min(fresh),
            Phase::Data { bytes } => {
                if self.min_data_rate == 0 {
                    return fresh;
                }
                let credit = Duration::from_secs_f64(bytes as f64 / self.min_data_rate as f64);
                (previous + credit).min(fresh)
            }
        }
    }
}

/// What the connection tells its reader after each chunk.
enum Next {
    /// Read the next chunk.
    More,
    /// Stop reading and hand the read half back (STARTTLS).
    Stop,
}

/// The write half of the connection, plain or encrypted.
enum Writer {
    Plain(WriteHalf<TcpStream>),
    Tls(WriteHalf<TlsIo>),
}

impl Writer {
    async fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Writer::Plain(w) => {
                w.write_all(bytes).await?;
                w.flush().await
            }
            Writer::Tls(w) => {
                w.write_all(bytes).await?;
                w.flush().await
            }
        }
    }

    async fn shutdown(&mut self) {
        let _ = match self {
            Writer::Plain(w) => w.shutdown().await,
            Writer::Tls(w) => w.shutdown().await,
        };
    }
}

/// The reader task; a plain one can give its half back for the TLS upgrade.
enum Reader {
    /// Stopped.
    None,
    Plain(JoinHandle<Option<ReadHalf<TcpStream>>>),
    Tls(JoinHandle<Option<ReadHalf<TlsIo>>>),
}

impl Reader {
    fn abort(&self) {
        match self {
            Reader::None => {}
            Reader::Plain(h) => h.abort(),
            Reader::Tls(h) => h.abort(),
        }
    }
}

/// One accepted SMTP connection. Dropping it stops its reader.
pub struct Connection {
    writer: Option<Writer>,
    reader: Reader,
    more: mpsc::Sender<Next>,
    deadline: watch::Sender<Instant>,
    sink: InputSink,
    /// How long one reply may take to write before the client counts as gone.
    write_limit: Duration,
    /// What TLS negotiated, once encrypted (see [`Connection::tls_summary`]).
    tls_summary: Option<String>,
}

impl Connection {
    /// Starts reading a plain connection; the first chunk is due by `deadline`.
    pub fn plain(
        stream: TcpStream, sink: InputSink, deadline: Instant, write_limit: Duration,
    ) -> Self {
        let mut c = Connection::unstarted(sink, deadline, write_limit);
        c.start_plain(stream);
        c
    }

    /// A connection whose reader is not running yet.
    fn unstarted(sink: InputSink, deadline: Instant, write_limit: Duration) -> Self {
        let (deadline_tx, _) = watch::channel(deadline);
        let (more_tx, _) = mpsc::channel(1);
        Connection {
            writer: None,
            reader: Reader::None,
            more: more_tx,
            deadline: deadline_tx,
            sink,
            write_limit,
            tls_summary: None,
        }
    }

    /// Runs the TLS handshake first (implicit TLS, `server_smtp_tls_port`), bounded by
    /// `handshake_limit`, then starts reading.
    pub async fn implicit_tls(
        stream: TcpStream, acceptor: &TlsAcceptor, handshake_limit: Duration, sink: InputSink,
        deadline: Instant, write_limit: Duration,
    ) -> Result<Self, String> {
        let tls = handshake(acceptor, stream, handshake_limit).await?;
        let mut c = Connection::unstarted(sink, deadline, write_limit);
        c.start_tls_io(tls);
        Ok(c)
    }

    /// Whether the connection can still be written to.
    pub fn is_open(&self) -> bool {
        self.writer.is_some()
    }

    /// The deadline the pending (or next) read runs against.
    pub fn deadline(&self) -> Instant {
        *self.deadline.borrow()
    }

    /// Moves the read deadline; a read already waiting sees the change at once.
    pub fn set_deadline(&self, deadline: Instant) {
        self.deadline.send_replace(deadline);
    }

    /// Lets the reader read the next chunk, due by `deadline`.
    pub fn read_more(&self, deadline: Instant) {
        self.set_deadline(deadline);
        let _ = self.more.try_send(Next::More);
    }

    /// Sets how long one write may take.
    pub fn set_write_limit(&mut self, limit: Duration) {
        self.write_limit = limit;
    }

    /// Writes `bytes`; `false` (and the connection counts as closed) when the client is
    /// gone or does not take them within the write limit.
    pub async fn write(&mut self, bytes: &[u8]) -> bool {
        let Some(w) = self.writer.as_mut() else {
            return false;
        };
        let ok = matches!(
            tokio::time::timeout(self.write_limit, w.write_all(bytes)).await,
            Ok(Ok(()))
        );
        if !ok {
            self.writer = None;
        }
        ok
    }

    /// Closes our side after what was written; reading stops.
    pub async fn close(&mut self) {
        self.reader.abort();
        if let Some(mut w) = self.writer.take() {
            let _ = tokio::time::timeout(self.write_limit, w.shutdown()).await;
        }
    }

    /// STARTTLS: takes the plain socket back from the reader and the writer and runs the
    /// handshake on it (bounded by `limit`). The reader is idle (it delivered the chunk
    /// holding STARTTLS and waits for permission), so nothing more is read in plain text.
    /// On failure the connection is closed.
    pub async fn start_tls(
        &mut self, acceptor: &TlsAcceptor, limit: Duration,
    ) -> Result<(), String> {
        let reader = std::mem::replace(&mut self.reader, Reader::None);
        let Reader::Plain(handle) = reader else {
            self.reader = reader;
            return Err("not a plain connection".into());
        };
        let _ = self.more.send(Next::Stop).await;
        let read_half = match handle.await {
            Ok(Some(r)) => r,
            _ => {
                self.writer = None;
                return Err("the reader had already stopped".into());
            }
        };
        let Some(Writer::Plain(write_half)) = self.writer.take() else {
            return Err("no plain writer".into());
        };
        let stream = read_half.unsplit(write_half);
        let tls = handshake(acceptor, stream, limit).await?;
        self.start_tls_io(tls);
        Ok(())
    }

    /// Starts the reader task on `read_half`, with a fresh permission channel and the
    /// current deadline.
    fn spawn_reader<R>(&mut self, read_half: R) -> JoinHandle<Option<R>>
    where
        R: AsyncRead + Unpin + Send + 'static,
    {
        let (more_tx, more_rx) = mpsc::channel(1);
        self.more = more_tx;
        let deadline = self.deadline.subscribe();
        tokio::spawn(read_loop(read_half, self.sink.clone(), more_rx, deadline))
    }

    fn start_plain(&mut self, stream: TcpStream) {
        let (read_half, write_half) = tokio::io::split(stream);
        self.writer = Some(Writer::Plain(write_half));
        self.reader = Reader::Plain(self.spawn_reader(read_half));
    }

    /// What TLS negotiated, as Postfix's `Received:` header says it: `TLSv1.3 with
    /// cipher TLS_AES_256_GCM_SHA384 (256/256 bits)`. `None` on a plain connection.
    pub fn tls_summary(&self) -> Option<String> {
        self.tls_summary.clone()
    }

    fn start_tls_io(&mut self, stream: TlsIo) {
        self.tls_summary = Some(tls_summary(stream.get_ref().1));
        let (read_half, write_half) = tokio::io::split(stream);
        self.writer = Some(Writer::Tls(write_half));
        self.reader = Reader::Tls(self.spawn_reader(read_half));
    }
}

/// `TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)`: the protocol and the
/// cipher suite's IANA name with its key bits.
fn tls_summary(tls: &rustls::ServerConnection) -> String {
    let version = match tls.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_string(),
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_string(),
        Some(other) => format!("{other:?}"),
        None => "TLS".to_string(),
    };
    let suite = tls
        .negotiated_cipher_suite()
        .map(|s| format!("{:?}", s.suite()))
        .unwrap_or_else(|| "unknown".into());
    // rustls names TLS 1.3 suites TLS13_*; their IANA names are TLS_*.
    let suite = suite
        .strip_prefix("TLS13_")
        .map_or(suite.clone(), |s| format!("TLS_{s}"));
    let bits = if suite.contains("AES_128") { 128 } else { 256 };
    format!("{version} with cipher {suite} ({bits}/{bits} bits)")
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Runs the server side of the TLS handshake on `stream`.
async fn handshake(
    acceptor: &TlsAcceptor, stream: TcpStream, limit: Duration,
) -> Result<TlsIo, String> {
    match tokio::time::timeout(limit, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => Ok(tls),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

/// Answers a connection we will not serve (`421 ...`) and closes it, off the caller's
/// path and bounded in time, so a client that does not read cannot hold anything.
pub fn refuse(mut stream: TcpStream, reply: String) {
    tokio::spawn(async move {
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            let _ = stream.write_all(reply.as_bytes()).await;
            let _ = stream.shutdown().await;
        })
        .await;
    });
}

/// The size of the reader's next buffer: small while the client sends commands, doubled
/// (up to [`ReadChunk::MAX`]) each time a read fills it, as during DATA, and halved when
/// reads come back small again. A large message then arrives in a few reads (each one a
/// trip from the reader to the session and back) rather than many, and an idle session
/// holds only a small buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ReadChunk(usize);

impl ReadChunk {
    const MIN: usize = 4 * 1024;
    const MAX: usize = 64 * 1024;
    /// Reads up to this size are copied out of the buffer rather than handed over.
    const COPY_UP_TO: usize = 1024;

    /// An empty buffer of the current size (not zeroed: `read_buf` fills it).
    fn buffer(&self) -> Vec<u8> {
        Vec::with_capacity(self.0)
    }

    /// What a read left in `buf`, for the session, and `buf` emptied for the next read.
    /// A large read hands the buffer itself over (no copy of a message's text); a
    /// command is copied out, and the buffer (already in memory) is kept.
    fn take(&self, buf: &mut Vec<u8>) -> Vec<u8> {
        if buf.len() > Self::COPY_UP_TO {
            return std::mem::replace(buf, self.buffer());
        }
        let out = buf.clone();
        buf.clear();
        if buf.capacity() > 2 * self.0 {
            *buf = self.buffer();
        }
        out
    }

    /// A read gave `n` octets.
    fn filled(&mut self, n: usize) {
        if n >= self.0 {
            self.0 = (self.0 * 2).min(Self::MAX);
        } else if n < self.0 / 4 {
            self.0 = (self.0 / 2).max(Self::MIN);
        }
    }
}

impl Default for ReadChunk {
    fn default() -> Self {
        ReadChunk(Self::MIN)
    }
}

/// Reads chunks and hands them to the sink, one at a time, each against the deadline in
/// force (which may move while the read waits). Returns the read half on
/// [`Next::Stop`], `None` when the connection ended.
async fn read_loop<R: AsyncRead + Unpin>(
    mut reader: R, sink: InputSink, mut more: mpsc::Receiver<Next>,
    mut deadline: watch::Receiver<Instant>,
) -> Option<R> {
    let mut chunk = ReadChunk::default();
    let mut buf = chunk.buffer();
    loop {
        let read = loop {
            let due = *deadline.borrow_and_update();
            tokio::select! {
                r = reader.read_buf(&mut buf) => break Some(r),
                _ = tokio::time::sleep_until(due) => break None,
                changed = deadline.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                }
            }
        };
        match read {
            None => {
                sink(Input::Timeout);
                return None;
            }
            Some(Ok(0)) | Some(Err(_)) => {
                sink(Input::Eof);
                return None;
            }
            Some(Ok(n)) => {
                chunk.filled(n);
                if !sink(Input::Bytes(chunk.take(&mut buf))) {
                    return None;
                }
            }
        }
        // Wait until the session has dealt with what we sent.
        match more.recv().await {
            Some(Next::More) => {}
            Some(Next::Stop) => return Some(reader),
            None => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(timeout: u64, rate: u64) -> Deadlines {
        Deadlines {
            timeout: Duration::from_secs(timeout),
            min_data_rate: rate,
        }
    }

    #[test]
    fn the_read_buffer_grows_while_reads_fill_it_and_shrinks_when_they_do_not() {
        let mut c = ReadChunk::default();
        assert_eq!(c.buffer().capacity(), ReadChunk::MIN);
        c.filled(20);
        assert_eq!(c.0, ReadChunk::MIN, "commands keep it small");
        for _ in 0..10 {
            let full = c.0;
            c.filled(full);
        }
        assert_eq!(c.0, ReadChunk::MAX, "DATA grows it, up to the cap");
        c.filled(ReadChunk::MAX / 2);
        assert_eq!(c.0, ReadChunk::MAX, "a half-full read keeps it");
        for _ in 0..10 {
            c.filled(10);
        }
        assert_eq!(c.0, ReadChunk::MIN, "small reads shrink it back");
    }

    #[test]
    fn a_command_is_copied_out_and_a_large_read_hands_its_buffer_over() {
        let c = ReadChunk::default();
        let mut buf = c.buffer();
        buf.extend_from_slice(b"MAIL FROM:<a@b>\r\n");
        let kept = buf.as_ptr();
        assert_eq!(c.take(&mut buf), b"MAIL FROM:<a@b>\r\n");
        assert!(buf.is_empty());
        assert_eq!(buf.as_ptr(), kept, "the buffer is kept for the next read");
        buf.extend_from_slice(&[b'x'; 3000]);
        let given = buf.as_ptr();
        let out = c.take(&mut buf);
        assert_eq!(
            (out.len(), out.as_ptr()),
            (3000, given),
            "handed over, not copied"
        );
        assert!(buf.is_empty() && buf.capacity() >= ReadChunk::MIN);
        let mut big = ReadChunk(ReadChunk::MAX);
        let mut buf = big.buffer();
        big.filled(10);
        buf.extend_from_slice(b"QUIT\r\n");
        big.filled(10);
        big.filled(10);
        let _ = big.take(&mut buf);
        assert!(
            buf.capacity() <= 2 * big.0,
            "an idle session gives a large buffer back"
        );
    }

    #[test]
    fn a_new_command_gets_the_whole_timeout() {
        let t0 = Instant::now();
        let now = t0 + Duration::from_secs(7);
        assert_eq!(
            rules(10, 500).next(t0, now, Phase::NewCommand),
            now + Duration::from_secs(10)
        );
        assert_eq!(
            rules(10, 500).next(t0, now, Phase::DataStart),
            now + Duration::from_secs(10)
        );
    }

    #[test]
    fn a_partial_line_keeps_its_deadline_however_it_trickles() {
        let r = rules(10, 500);
        let start = Instant::now();
        let mut deadline = r.next(start, start, Phase::NewCommand);
        // One byte a second never moves the deadline.
        for s in 1..=9 {
            deadline = r.next(
                deadline,
                start + Duration::from_secs(s),
                Phase::PartialCommand,
            );
        }
        assert_eq!(deadline, start + Duration::from_secs(10));
    }

    #[test]
    fn data_needs_the_minimum_rate() {
        let r = rules(10, 500);
        let start = Instant::now();
        let mut deadline = r.next(start, start, Phase::DataStart);
        // 100 bytes a second (below 500 B/s): each second earns 0.2 s, so the deadline
        // creeps toward `now` and passes before 13 s (10 s / 0.8 per second = 12.5 s).
        let mut t = start;
        let mut survived = 0;
        while deadline > t {
            t += Duration::from_secs(1);
            if deadline <= t {
                break;
            }
            survived += 1;
            deadline = r.next(deadline, t, Phase::Data { bytes: 100 });
        }
        assert!((11..=13).contains(&survived), "{survived}");
        // 1000 bytes a second (above the rate): the deadline stays `timeout` ahead.
        let mut deadline = r.next(start, start, Phase::DataStart);
        for s in 1..=1000 {
            let now = start + Duration::from_secs(s);
            assert!(deadline > now);
            deadline = r.next(deadline, now, Phase::Data { bytes: 1000 });
        }
        assert_eq!(deadline, start + Duration::from_secs(1010));
    }

    #[test]
    fn no_minimum_rate_means_a_fresh_deadline_per_read() {
        let r = rules(10, 0);
        let t0 = Instant::now();
        let now = t0 + Duration::from_secs(30);
        assert_eq!(
            r.next(t0, now, Phase::Data { bytes: 1 }),
            now + Duration::from_secs(10)
        );
    }

    #[tokio::test]
    async fn a_trickling_line_times_out_at_its_deadline() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            for _ in 0..40 {
                if s.write_all(b"x").await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        let (stream, _) = listener.accept().await.unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let sink: InputSink = Arc::new(move |i| tx.send(i).is_ok());
        let start = Instant::now();
        let rules = Deadlines {
            timeout: Duration::from_millis(400),
            min_data_rate: 0,
        };
        let mut deadline = rules.next(start, start, Phase::NewCommand);
        let conn = Connection::plain(stream, sink, deadline, Duration::from_secs(1));
        let mut bytes = 0;
        loop {
            match rx.recv().await.unwrap() {
                Input::Bytes(b) => {
                    bytes += b.len();
                    deadline = rules.next(deadline, Instant::now(), Phase::PartialCommand);
                    conn.read_more(deadline);
                }
                Input::Timeout => break,
                Input::Eof => panic!("client closed first"),
            }
        }
        let took = start.elapsed();
        assert!(bytes > 2, "{bytes}");
        // The client trickles for 2 s and then closes: a timeout before its EOF is the
        // deadline at work (an idle timer restarted by each byte would never fire).
        assert!(took >= Duration::from_millis(390), "{took:?}");
        client.abort();
    }

    #[tokio::test]
    async fn a_shortened_deadline_ends_a_pending_read() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let sink: InputSink = Arc::new(move |i| tx.send(i).is_ok());
        let start = Instant::now();
        let conn = Connection::plain(
            stream,
            sink,
            start + Duration::from_secs(3600),
            Duration::from_secs(1),
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        conn.set_deadline(Instant::now() + Duration::from_millis(100));
        assert!(matches!(rx.recv().await, Some(Input::Timeout)));
        assert!(start.elapsed() < Duration::from_secs(2));
    }
}
