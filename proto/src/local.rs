//! Framing of the local agent <-> runtime protocol: a 4-byte big-endian length,
//! then that many bytes of UTF-8 JSON holding one [`RuntimeFrame`] in the
//! proto3 JSON mapping. JSON rather than protobuf on this socket keeps the
//! Python runtime on the standard library.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::v1::RuntimeFrame;

/// Largest frame either side accepts; a bigger length prefix is garbage or abuse.
pub const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;

/// What can go wrong reading or writing a frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("local socket I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame of {len} bytes exceeds the {max}-byte limit (peer is not a hotfleet runtime, or is broken)", max = MAX_FRAME_BYTES)]
    TooLarge { len: usize },
    #[error("connection closed in the middle of a frame")]
    Truncated,
    /// The framing is intact but the payload is not a valid frame: the
    /// connection can go on after answering with an error frame.
    #[error("malformed frame: {0}")]
    Malformed(String),
}

impl FrameError {
    /// Whether the byte stream is still in sync after this error.
    pub fn is_recoverable(&self) -> bool {
        matches!(self, FrameError::Malformed(_))
    }
}

/// Reads one frame. `Ok(None)` is a clean end of stream between frames.
pub async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Option<RuntimeFrame>, FrameError> {
    let mut len_bytes = [0u8; 4];
    let mut filled = 0;
    while filled < len_bytes.len() {
        let n = reader.read(&mut len_bytes[filled..]).await?;
        if n == 0 {
            return if filled == 0 { Ok(None) } else { Err(FrameError::Truncated) };
        }
        filled += n;
    }
    let len = u32::from_be_bytes(len_bytes) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge { len });
    }
    let mut payload = vec![0u8; len];
    reader.read_exact(&mut payload).await.map_err(|err| {
        if err.kind() == std::io::ErrorKind::UnexpectedEof {
            FrameError::Truncated
        } else {
            FrameError::Io(err)
        }
    })?;
    decode_payload(&payload).map(Some)
}

/// Decodes a frame payload (the JSON after the length prefix).
pub fn decode_payload(payload: &[u8]) -> Result<RuntimeFrame, FrameError> {
    let text = std::str::from_utf8(payload).map_err(|err| FrameError::Malformed(format!("not UTF-8: {err}")))?;
    serde_json::from_str(text).map_err(|err| FrameError::Malformed(err.to_string()))
}

/// Encodes a frame with its length prefix.
pub fn encode_frame(frame: &RuntimeFrame) -> Result<Vec<u8>, FrameError> {
    let json = serde_json::to_vec(frame).map_err(|err| FrameError::Malformed(err.to_string()))?;
    if json.len() > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge { len: json.len() });
    }
    let mut out = Vec::with_capacity(json.len() + 4);
    out.extend_from_slice(&(json.len() as u32).to_be_bytes());
    out.extend_from_slice(&json);
    Ok(out)
}

/// Writes one frame and flushes it.
pub async fn write_frame<W: AsyncWrite + Unpin>(writer: &mut W, frame: &RuntimeFrame) -> Result<(), FrameError> {
    let bytes = encode_frame(frame)?;
    writer.write_all(&bytes).await?;
    writer.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{runtime_frame::Body, Hello};

    fn hello_frame() -> RuntimeFrame {
        RuntimeFrame {
            id: 7,
            reply_to: 0,
            traceparent: String::new(),
            body: Some(Body::Hello(Hello {
                protocol_version: 1,
                process_id: "42-abcd".into(),
                pid: 42,
                build: "b1".into(),
                packages: vec!["zone".into()],
                ..Default::default()
            })),
        }
    }

    #[tokio::test]
    async fn round_trips_through_a_stream() {
        let bytes = encode_frame(&hello_frame()).expect("encode");
        let mut reader = &bytes[..];
        let frame = read_frame(&mut reader).await.expect("read").expect("one frame");
        assert_eq!(frame, hello_frame());
        assert!(read_frame(&mut reader).await.expect("clean eof").is_none());
    }

    #[test]
    fn json_uses_the_proto3_mapping() {
        let bytes = encode_frame(&hello_frame()).expect("encode");
        let json: serde_json::Value = serde_json::from_slice(&bytes[4..]).expect("json");
        assert_eq!(json["hello"]["protocolVersion"], 1);
        assert_eq!(json["hello"]["processId"], "42-abcd");
        // A Python peer writes 64-bit ids as plain numbers; they must parse.
        let frame = decode_payload(br#"{"id": 3, "statusQuery": {}}"#).expect("decode");
        assert_eq!(frame.id, 3);
        assert!(matches!(frame.body, Some(Body::StatusQuery(_))));
    }

    #[tokio::test]
    async fn rejects_oversized_and_truncated_frames() {
        let huge = (MAX_FRAME_BYTES as u32 + 1).to_be_bytes();
        let err = read_frame(&mut &huge[..]).await.expect_err("too large");
        assert!(matches!(err, FrameError::TooLarge { .. }));
        let cut = [0u8, 0, 0, 10, b'{'];
        let err = read_frame(&mut &cut[..]).await.expect_err("truncated");
        assert!(matches!(err, FrameError::Truncated));
        let half_len = [0u8, 0];
        assert!(matches!(read_frame(&mut &half_len[..]).await, Err(FrameError::Truncated)));
    }

    #[test]
    fn garbage_payload_is_recoverable_malformed() {
        let err = decode_payload(b"\xff\xfe not json").expect_err("garbage");
        assert!(err.is_recoverable());
        let err = decode_payload(br#"{"id": "x"}"#).expect_err("bad id");
        assert!(err.is_recoverable());
    }
}
