//! Bytes as standard base64 (with padding) in JSON records: a serde `with`
//! module for `Vec<u8>` (`#[serde(with = "lattice_shared::serde_b64")]`), one
//! for `Vec<Vec<u8>>` ([`vec`]) and the two plain conversions.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Deserializer, Serializer};

pub fn encode(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

pub fn decode(text: &str) -> Result<Vec<u8>, base64::DecodeError> {
    STANDARD.decode(text)
}

pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&encode(v))
}

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    let s = String::deserialize(d)?;
    decode(&s).map_err(serde::de::Error::custom)
}

/// A list of byte strings as a JSON array of base64 strings.
pub mod vec {
    use serde::ser::SerializeSeq as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[Vec<u8>], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(v.len()))?;
        for x in v {
            seq.serialize_element(&super::encode(x))?;
        }
        seq.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<u8>>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|s| super::decode(s).map_err(serde::de::Error::custom))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Rec {
        #[serde(with = "crate::serde_b64")]
        one: Vec<u8>,
        #[serde(default, with = "crate::serde_b64::vec")]
        many: Vec<Vec<u8>>,
    }

    #[test]
    fn bytes_round_trip_as_padded_standard_base64() {
        let r = Rec {
            one: vec![0xfb, 0xff, 0x01],
            many: vec![b"a".to_vec(), vec![]],
        };
        let json = serde_json::to_string(&r).expect("json");
        assert_eq!(json, r#"{"one":"+/8B","many":["YQ==",""]}"#);
        assert_eq!(serde_json::from_str::<Rec>(&json).expect("back"), r);
        assert_eq!(super::decode(&super::encode(b"xyz")).expect("b64"), b"xyz");
    }

    #[test]
    fn invalid_base64_is_an_error() {
        assert!(serde_json::from_str::<Rec>(r#"{"one":"not base64!"}"#).is_err());
        assert!(serde_json::from_str::<Rec>(r#"{"one":"","many":["%"]}"#).is_err());
    }
}
