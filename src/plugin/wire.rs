//! Docker's volume plugin protocol, field names exactly as moby spells them.
//! dockerd sends no Content-Type, an empty body for Plugin.Activate, and a
//! trailing newline after the JSON.

use serde::de::DeserializeOwned;
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Debug, Deserialize)]
pub struct CreateRequest {
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "Opts", default)]
    pub opts: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize)]
pub struct NameRequest {
    #[serde(rename = "Name")]
    pub name: String,
}

#[derive(Debug, Deserialize)]
pub struct MountRequest {
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "ID", default)]
    pub id: String,
}

/// Decode a request body, with an error that says what was expected.
pub fn decode<T: DeserializeOwned>(
    endpoint: &str,
    body: &[u8],
    expected: &str,
) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|e| {
        format!("malformed request body for {endpoint}: {e}; expected JSON like {expected}")
    })
}

pub const CREATE_SHAPE: &str = r#"{"Name": "vol", "Opts": {"size": "10G"}}"#;
pub const NAME_SHAPE: &str = r#"{"Name": "vol"}"#;
pub const MOUNT_SHAPE: &str = r#"{"Name": "vol", "ID": "<mount id>"}"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_what_dockerd_sends() {
        let r: CreateRequest =
            decode("c", b"{\"Name\":\"v\",\"Opts\":{\"size\":\"1G\"}}\n", "").unwrap();
        assert_eq!(r.name, "v");
        assert_eq!(r.opts.unwrap()["size"], "1G");
        let r: CreateRequest = decode("c", b"{\"Name\":\"v\",\"Opts\":null}\n", "").unwrap();
        assert!(r.opts.is_none());
        let r: MountRequest = decode("m", b"{\"Name\":\"v\",\"ID\":\"abc\"}\n", "").unwrap();
        assert_eq!(r.id, "abc");
    }

    #[test]
    fn malformed_bodies_say_what_is_expected() {
        let e = decode::<NameRequest>("VolumeDriver.Get", b"{\"Name\":", NAME_SHAPE).unwrap_err();
        assert!(
            e.contains("VolumeDriver.Get") && e.contains("expected JSON like"),
            "{e}"
        );
        let e = decode::<CreateRequest>("c", b"{\"Name\":\"v\",\"Opts\":{\"size\":5}}", "")
            .unwrap_err();
        assert!(e.contains("malformed"), "{e}");
    }
}
