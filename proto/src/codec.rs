//! The codec every hotfleet service is generated with: prost's, starting
//! each call's buffers small.
//!
//! tonic gives every call, and every stream for as long as it is open, an
//! encode and a decode buffer of 8 KiB up front. An attached agent's stream
//! (`AgentGateway.Attach`) is open as long as the agent runs, so those two
//! buffers alone were ~16 KB of the coordinator's memory per agent, for
//! messages of a few hundred bytes (measured: docs/performance.md). A buffer
//! still grows to what a message needs: a decode reserves the message's
//! length, an encode grows as prost writes; so a large message costs only a
//! few reallocations more.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Bytes each buffer starts with: commands, answers and heartbeats are a
/// few hundred bytes, and a buffer grows to the message. 1 KiB cost ~1.5 KB per
/// attached agent at the coordinator for buffers mostly empty (measured:
/// docs/performance.md, ninth part).
const FIRST_BUFFER: usize = 256;
/// tonic's default: how much an encoder writes before yielding.
const YIELD_THRESHOLD: usize = 32 * 1024;

fn settings() -> BufferSettings {
    BufferSettings::new(FIRST_BUFFER, YIELD_THRESHOLD)
}

/// prost encoding with small first buffers (see the module docs).
#[derive(Debug, Clone, Copy)]
pub struct SmallBuffers<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SmallBuffers<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for SmallBuffers<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(settings())
    }
}
