//! Shared test support, by concern: real servers (`servers`), the store
//! under test and the `backend_tests!` macro (`backend`), the test app and
//! request helpers (`app`), raw HTTP/1.1 to example processes (`http`).

#![allow(dead_code, unreachable_pub)]

pub mod app;
pub mod backend;
pub mod http;
pub mod servers;

// Each test binary uses a part of these.
#[allow(unused_imports)]
pub use app::*;
#[allow(unused_imports)]
pub use backend::*;
#[allow(unused_imports)]
pub use servers::*;
