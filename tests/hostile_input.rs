//! Hostile and unsafe input through the real binary (issue #14, "Open to the internet"):
//! clients that pipeline where they may not, text sent behind DATA before the 354, a NUL
//! byte in a message, and a line far over 998 octets relayed to a next hop. Every next
//! hop is a recording sink on 127.0.0.1; the daemon relays for 127.0.0.1.

#[path = "support/daemon.rs"]
mod daemon;
#[path = "support/sink.rs"]
mod sink;
#[path = "support/wire.rs"]
mod wire;

use std::io::Read;
use std::time::Duration;

use daemon::{wait_until, Daemon, Smtp};
use sink::{Sink, SinkConfig};

const SYNC: &str = "554 5.5.0 Error: SMTP protocol synchronization";

/// Asserts that the next reply is the 554 for a client out of step and that the server
/// then closes the connection without another word.
fn refused_out_of_sync(s: &mut Smtp) {
    assert_eq!(s.read_reply(), SYNC);
    assert_eq!(read_until_closed(s), "");
}

/// A sink and a daemon that relays everything from 127.0.0.1 to it.
async fn relay_daemon() -> (Sink, Daemon) {
    let sink = Sink::start(SinkConfig::default()).await;
    let d = Daemon::start(&format!(
        "server_smtp_relay_clients: [\"127.0.0.1/32\"]\n\
         server_smtp_relay_host: \"127.0.0.1:{}\"\n\
         server_smtp_name: \"relay.test\"\n\
         server_smtp_queue_interval: \"100ms\"\n",
        sink.port()
    ));
    (sink, d)
}

/// An EHLO client's session that sends MAIL and RCPT and then `rest` in one write;
/// asserts that MAIL and RCPT are accepted.
fn ehlo_pipelining(d: &Daemon, rest: &[u8]) -> Smtp {
    let mut s = d.connect_ehlo("client.test");
    let mut group = b"MAIL FROM:<a@client.test>\r\nRCPT TO:<b@remote.test>\r\n".to_vec();
    group.extend_from_slice(rest);
    s.send_raw(&group);
    assert!(s.read_reply().starts_with("250 2.1.0"));
    assert!(s.read_reply().starts_with("250 2.1.5"));
    s
}

/// Everything the server still writes until it closes the connection (a read timeout
/// fails the test: the connection must be closed, not left open).
fn read_until_closed(s: &mut Smtp) -> String {
    let mut rest = Vec::new();
    s.stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    s.stream
        .read_to_end(&mut rest)
        .expect("the server closes the connection");
    String::from_utf8_lossy(&rest).into_owned()
}

/// Nothing reached the sink or stayed in the queue, after giving a delivery time to
/// happen (the queue ticks every 100 ms).
async fn nothing_delivered(d: &Daemon, sink: &Sink) {
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(sink.count(), 0, "{:?}", sink.messages());
    assert!(d.queue_is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5000_octet_line_leaves_broken_at_998_with_crlf_space() {
    let (sink, d) = relay_daemon().await;
    let long = (0..5000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect::<String>();
    // A long header, a long body line, and a long line that starts with a dot (its
    // stuffing must survive the breaks).
    let dotted = format!(".{}", "d".repeat(4000));
    let body =
        format!("Subject: {long}\r\nFrom: a@client.test\r\n\r\n{long}\r\n{dotted}\r\nend\r\n");
    let mut s = d.connect_ehlo("client.test");
    // Dot-stuffed on the way in, as any client must.
    s.send_ok(
        "a@client.test",
        &["b@remote.test"],
        &body.replace("\r\n.", "\r\n.."),
    );
    let _ = s.cmd("QUIT");
    assert!(
        sink.wait_for(1, Duration::from_secs(15)).await,
        "{}",
        d.log_text()
    );
    let data = sink.messages()[0].data.clone();
    for line in data.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        assert!(line.len() <= 998, "a line of {} octets left", line.len());
    }
    let text = String::from_utf8(data).unwrap();
    // The first piece of a broken line is exactly 998 octets.
    assert!(
        text.contains(&format!("\r\nSubject: {}\r\n ", &long[..998 - 9])),
        "{}",
        &text[..text.len().min(1200)]
    );
    assert!(text.contains(&format!("\r\n\r\n{}\r\n ", &long[..998])));
    // Only CRLF SP was inserted: taking it out gives the message back.
    let unbroken = text.replace("\r\n ", "");
    assert!(
        unbroken.ends_with(&body),
        "{:?}",
        &unbroken[unbroken.len().saturating_sub(body.len() + 40)..]
    );
    wait_until("empty queue", Duration::from_secs(10), || {
        d.queue_is_empty()
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_with_a_nul_byte_is_refused_and_goes_nowhere() {
    let (sink, d) = relay_daemon().await;
    let mut s = d.connect_ehlo("client.test");
    s.begin_data("MAIL FROM:<a@client.test>", &["RCPT TO:<b@remote.test>"]);
    s.send_raw(b"Subject: nul\r\n\r\nbefore\0after\r\n");
    assert_eq!(
        s.cmd("."),
        "550 5.6.0 Error: message contains NUL character"
    );
    // The session goes on; a clean message afterwards is delivered.
    assert!(s.cmd("NOOP").starts_with("250"));
    nothing_delivered(&d, &sink).await;
    s.send_ok(
        "a@client.test",
        &["b@remote.test"],
        "Subject: clean\r\n\r\nok\r\n",
    );
    assert!(sink.wait_for(1, Duration::from_secs(10)).await);
    assert!(!sink.messages()[0].data.contains(&0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_helo_client_that_pipelines_gets_554_and_is_disconnected() {
    let (sink, d) = relay_daemon().await;
    let group = b"MAIL FROM:<a@client.test>\r\nRCPT TO:<b@remote.test>\r\nDATA\r\n";
    // HELO answered, then MAIL, RCPT and DATA in one write.
    let mut s = d.connect();
    assert!(s.cmd("HELO client.test").starts_with("250"));
    s.send_raw(group);
    refused_out_of_sync(&mut s);
    // HELO itself with the rest behind it, and the message text too.
    let mut s = d.connect();
    let mut all = b"HELO client.test\r\n".to_vec();
    all.extend_from_slice(group);
    all.extend_from_slice(b"Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n");
    s.send_raw(&all);
    refused_out_of_sync(&mut s);
    nothing_delivered(&d, &sink).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_sent_with_data_before_the_354_is_never_a_message() {
    let (sink, d) = relay_daemon().await;
    let mut s = d.connect_ehlo("client.test");
    assert!(s.cmd("MAIL FROM:<a@client.test>").starts_with("250"));
    assert!(s.cmd("RCPT TO:<b@remote.test>").starts_with("250"));
    s.send_raw(b"DATA\r\nSubject: blind\r\n\r\nbody\r\n.\r\n");
    refused_out_of_sync(&mut s);
    // The same as an EHLO client's pipelined group (MAIL, RCPT, DATA and the text).
    let mut s = ehlo_pipelining(&d, b"DATA\r\nSubject: blind\r\n\r\nbody\r\n.\r\n");
    refused_out_of_sync(&mut s);
    nothing_delivered(&d, &sink).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ehlo_client_pipelining_mail_rcpt_data_is_served() {
    let (sink, d) = relay_daemon().await;
    let mut s = ehlo_pipelining(&d, b"DATA\r\n");
    assert!(s.read_reply().starts_with("354"));
    s.send_raw(b"Subject: grouped\r\n\r\nbody\r\n.\r\nQUIT\r\n");
    assert!(s.read_reply().starts_with("250 2.0.0"));
    assert!(s.read_reply().starts_with("221"));
    assert!(sink.wait_for(1, Duration::from_secs(10)).await);
}
