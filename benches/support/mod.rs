//! What the benches share: the handler the cache layer sits in front of.

use http_body_util::Empty;
use std::convert::Infallible;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use tower::Service;

/// A handler answering a small JSON body, as an item endpoint would.
pub fn handler() -> impl Service<
    Request<Empty<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone {
    tower::service_fn(|_req: Request<Empty<Bytes>>| async {
        let mut response =
            Response::new(Full::new(Bytes::from_static(br#"{"id":1,"name":"Ana"}"#)));
        response
            .headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        Ok::<_, Infallible>(response)
    })
}
