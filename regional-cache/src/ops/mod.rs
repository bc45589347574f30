//! The cache's operations on typed input, one module each: they decide,
//! act and return domain results; `api.rs` decodes the wire into their
//! input and encodes what they return.

pub(crate) mod enrol;
pub(crate) mod lease;
pub(crate) mod report;
pub(crate) mod token;
