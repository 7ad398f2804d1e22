//! The one tower layer that admits or refuses every request a hotfleet
//! server receives, before any handler runs. What to check is the server's
//! business (a [`Gate`]); this file only puts it in front of the routes and
//! turns a refusal into a gRPC status answer.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use tonic::{
    body::Body,
    codegen::{http, Service},
    Status,
};

/// Decides on one request. It may attach what handlers need (the caller's
/// identity) to the request's extensions.
pub trait Gate: Clone + Send + Sync + 'static {
    fn admit<B>(&self, request: &mut http::Request<B>) -> Result<(), Status>;
}

/// `tonic::transport::Server::builder().layer(GateLayer(gate))`.
#[derive(Debug, Clone)]
pub struct GateLayer<G>(pub G);

impl<S, G: Clone> tower::Layer<S> for GateLayer<G> {
    type Service = Gated<S, G>;

    fn layer(&self, inner: S) -> Self::Service {
        Gated { inner, gate: self.0.clone() }
    }
}

/// The routes behind a [`Gate`].
#[derive(Debug, Clone)]
pub struct Gated<S, G> {
    inner: S,
    gate: G,
}

type Answer<E> = Pin<Box<dyn Future<Output = Result<http::Response<Body>, E>> + Send>>;

impl<S, G, B> Service<http::Request<B>> for Gated<S, G>
where
    S: Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    G: Gate,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Answer<S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        match self.gate.admit(&mut request) {
            Ok(()) => Box::pin(self.inner.call(request)),
            Err(status) => Box::pin(std::future::ready(Ok(status.into_http()))),
        }
    }
}
