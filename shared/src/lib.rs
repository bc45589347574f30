//! Common ground of every Lattice component: ids, clock, storage, PKI, TLS, tokens, wire code.
pub mod proto {
    //! Generated wire types (`proto/lattice/v1`). Only the wire layer touches these.
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("lattice.v1");
}

pub mod backoff;
pub mod chunk;
pub mod clock;
pub mod config;
pub mod envelope;
pub mod eventlog;
pub mod id;
pub mod kms;
pub mod limits;
pub mod merkle;
pub mod net;
pub mod pem;
pub mod pki;
pub mod policy;
pub mod posture;
pub mod revocation;
pub mod seal;
pub mod secret;
pub mod serde_b64;
pub mod signal;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod token;
pub mod verifier;
