//! A minimal QMP client: capabilities negotiation, commands, and the events that arrive
//! between replies.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Every event received so far, in order.
    pub events: Vec<Value>,
}

impl Qmp {
    /// Connects (retrying while QEMU creates the socket) and leaves capabilities mode.
    pub fn connect(path: &Path, timeout: Duration) -> io::Result<Qmp> {
        let end = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= end => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            events: Vec::new(),
        };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(io::Error::other(format!(
                "unexpected QMP greeting {greeting}"
            )));
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn read_message(&mut self) -> io::Result<Value> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "QMP connection closed",
            ));
        }
        serde_json::from_str(&line)
            .map_err(|e| io::Error::other(format!("bad QMP message {line:?}: {e}")))
    }

    /// Runs a command and returns its `return` value; events read meanwhile are kept.
    pub fn execute(&mut self, command: &str, arguments: Value) -> io::Result<Value> {
        let request = json!({ "execute": command, "arguments": arguments });
        self.writer.write_all(format!("{request}\n").as_bytes())?;
        loop {
            let message = self.read_message()?;
            if message.get("event").is_some() {
                self.events.push(message);
            } else if let Some(ret) = message.get("return") {
                return Ok(ret.clone());
            } else if let Some(err) = message.get("error") {
                return Err(io::Error::other(format!("QMP {command} failed: {err}")));
            }
        }
    }

    /// Reads events until one named `name` arrives or `timeout` passes.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> io::Result<Value> {
        if let Some(e) = self.events.iter().find(|e| e["event"] == name) {
            return Ok(e.clone());
        }
        let end = Instant::now() + timeout;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no QMP event {name}"),
                ));
            }
            self.writer.set_read_timeout(Some(left))?;
            let message = self.read_message()?;
            if message.get("event").is_some() {
                self.events.push(message.clone());
                if message["event"] == name {
                    return Ok(message);
                }
            }
        }
    }
}
