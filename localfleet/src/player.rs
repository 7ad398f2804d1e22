//! A TCP player client of a zone server (newline-delimited JSON).

use std::{
    io::{BufRead, BufReader, Write},
    net::TcpStream,
    time::Duration,
};

use serde_json::{json, Value};

use crate::{FleetError, Result};

/// A player connected to a zone server over TCP (newline-delimited JSON).
pub struct Player {
    pub name: String,
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    seq: u64,
}

impl Player {
    /// Connects and logs in.
    pub fn connect(port: u16, name: &str) -> Result<Self> {
        let fail = |message: String| FleetError::Player { name: name.to_string(), message };
        let stream = TcpStream::connect(("127.0.0.1", port)).map_err(|e| fail(format!("cannot connect: {e}")))?;
        stream.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| fail(e.to_string()))?;
        let writer = stream.try_clone().map_err(|e| fail(e.to_string()))?;
        let mut player = Player { name: name.to_string(), reader: BufReader::new(stream), writer, seq: 0 };
        let reply = player.request(json!({"type": "login", "name": name}))?;
        if reply["ok"] != true {
            return Err(fail(format!("login refused: {reply}")));
        }
        Ok(player)
    }

    /// Sends one request and returns its reply; a dropped connection is an error.
    pub fn request(&mut self, mut msg: Value) -> Result<Value> {
        let fail = |message: String| FleetError::Player { name: self.name.clone(), message };
        self.seq += 1;
        msg["seq"] = json!(self.seq);
        self.writer.write_all(format!("{msg}\n").as_bytes()).map_err(|e| fail(format!("connection lost: {e}")))?;
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).map_err(|e| fail(format!("connection lost: {e}")))?;
            if n == 0 {
                return Err(fail("connection closed by the server".into()));
            }
            let reply: Value = serde_json::from_str(&line).map_err(|e| fail(format!("bad reply {line:?}: {e}")))?;
            if reply.get("seq") == Some(&json!(self.seq)) {
                return Ok(reply);
            }
        }
    }

    /// Whether the connection still answers a ping.
    pub fn connected(&mut self) -> bool {
        self.request(json!({"type": "ping"})).is_ok_and(|r| r["ok"] == true)
    }

    /// The player's full state and the serving process's pid.
    pub fn stats(&mut self) -> Result<Value> {
        self.request(json!({"type": "stats"}))
    }

    /// Hits the training dummy once; returns the damage dealt.
    pub fn hit_dummy(&mut self) -> Result<i64> {
        let reply = self.request(json!({"type": "attack", "target": "dummy"}))?;
        reply["damage"].as_i64().ok_or_else(|| FleetError::Player {
            name: self.name.clone(),
            message: format!("attack reply without damage: {reply}"),
        })
    }
}
