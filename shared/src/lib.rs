//! Common ground of every Lattice component: ids, clock, storage, PKI, TLS, tokens, wire code.
pub mod proto {
    //! Generated wire types (`proto/lattice/v1`). Only the wire layer touches these.
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("lattice.v1");

    /// The generated services' codec: prost's, except that a body that does
    /// not decode is the sender's fault (`INVALID_ARGUMENT`), not `INTERNAL`.
    pub mod codec {
        use prost::Message;
        use tonic::Status;
        use tonic::codec::{Codec, DecodeBuf, Decoder};
        use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

        #[derive(Debug, Clone, Default)]
        pub struct LatticeCodec<T, U>(ProstCodec<T, U>);

        impl<T, U> Codec for LatticeCodec<T, U>
        where
            T: Message + Send + 'static,
            U: Message + Default + Send + 'static,
        {
            type Encode = T;
            type Decode = U;
            type Encoder = ProstEncoder<T>;
            type Decoder = LatticeDecoder<U>;
            fn encoder(&mut self) -> Self::Encoder {
                self.0.encoder()
            }
            fn decoder(&mut self) -> Self::Decoder {
                LatticeDecoder(self.0.decoder())
            }
        }

        #[derive(Debug, Clone, Default)]
        pub struct LatticeDecoder<U>(ProstDecoder<U>);

        impl<U: Message + Default> Decoder for LatticeDecoder<U> {
            type Item = U;
            type Error = Status;
            fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
                self.0.decode(buf).map_err(|s| {
                    Status::invalid_argument(format!("malformed protobuf message: {}", s.message()))
                })
            }
            fn buffer_settings(&self) -> tonic::codec::BufferSettings {
                self.0.buffer_settings()
            }
        }
    }
}

pub mod admission;
pub mod backoff;
pub mod chunk;
pub mod clock;
pub mod config;
pub mod envelope;
pub mod eventlog;
pub mod freshness;
pub mod id;
pub mod install;
pub mod kms;
pub mod limits;
pub mod merkle;
pub mod net;
pub mod pem;
pub mod persist;
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
