//! Response bodies of the proxy: a fixed one, or the upstream's streamed
//! through the scrubber, bounded in size and idle time.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::scrub::Scrubber;

pub(super) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Response bodies of the proxy.
pub(super) enum ProxyBody {
    Full(Full<Bytes>),
    Scrub(Box<ScrubBody>),
}

impl ProxyBody {
    pub(super) fn empty() -> Self {
        ProxyBody::Full(Full::new(Bytes::new()))
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ProxyBody::Full(f) => match Pin::new(f).poll_frame(cx) {
                Poll::Ready(Some(Ok(fr))) => Poll::Ready(Some(Ok(fr))),
                Poll::Ready(Some(Err(never))) => match never {},
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
            ProxyBody::Scrub(s) => Pin::new(s.as_mut()).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Full(f) => f.is_end_stream(),
            ProxyBody::Scrub(s) => s.done,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Full(f) => f.size_hint(),
            ProxyBody::Scrub(_) => SizeHint::default(),
        }
    }
}

/// An upstream response body with the key scrubbed out, bounded in size and
/// in idle time.
pub(super) struct ScrubBody {
    pub(super) inner: Incoming,
    pub(super) scrubber: Scrubber,
    pub(super) received: u64,
    pub(super) max: u64,
    pub(super) idle: Duration,
    pub(super) idle_timer: Pin<Box<tokio::time::Sleep>>,
    pub(super) done: bool,
}

impl Body for ScrubBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let deadline = tokio::time::Instant::now() + this.idle;
                    this.idle_timer.as_mut().reset(deadline);
                    // Trailers are dropped: the request asked for none (`te`
                    // is not forwarded).
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    this.received = this.received.saturating_add(data.len() as u64);
                    if this.received > this.max {
                        this.done = true;
                        return Poll::Ready(Some(Err(format!(
                            "upstream response body larger than {} bytes",
                            this.max
                        )
                        .into())));
                    }
                    let out = this.scrubber.push(&data);
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(e.into())));
                }
                Poll::Ready(None) => {
                    this.done = true;
                    let rest = this.scrubber.finish();
                    if rest.is_empty() {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(rest))));
                }
                Poll::Pending => {
                    if this.idle_timer.as_mut().poll(cx).is_ready() {
                        this.done = true;
                        return Poll::Ready(Some(Err("upstream response body stalled".into())));
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}
