//! The CNI types this plugin speaks (CNI spec 1.1.0, section 5, and the 1.0.0 and 0.4.0
//! forms): errors with the spec's codes, the ADD result, VERSION.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// The versions this plugin supports, oldest first.
pub const SUPPORTED_VERSIONS: [&str; 3] = ["0.4.0", "1.0.0", "1.1.0"];

/// The spec's well-known error codes (section 5, "Error").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    IncompatibleVersion = 1,
    UnsupportedField = 2,
    UnknownContainer = 3,
    InvalidEnvironment = 4,
    Io = 5,
    Decode = 6,
    InvalidConfig = 7,
    TryAgainLater = 11,
    NotAvailable = 50,
    /// Plugin-specific: the data plane refused or failed a request.
    DataPlane = 100,
    /// Plugin-specific: setting up the interface failed.
    Setup = 101,
}

/// A CNI error: its code, a short message and the details naming the cause.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{msg}: {details}")]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: Code, details: impl Into<String>) -> Self {
        let msg = match code {
            Code::IncompatibleVersion => "incompatible CNI version",
            Code::UnsupportedField => "unsupported field in network configuration",
            Code::UnknownContainer => "container unknown or does not exist",
            Code::InvalidEnvironment => "invalid environment variables",
            Code::Io => "I/O failure",
            Code::Decode => "failed to decode content",
            Code::InvalidConfig => "invalid network configuration",
            Code::TryAgainLater => "try again later",
            Code::NotAvailable => "plugin not available",
            Code::DataPlane => "torii-dataplane request failed",
            Code::Setup => "interface setup failed",
        };
        CniError {
            code: code as u32,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// An error passed on from a delegated plugin, as it reported it.
    pub fn delegated(code: u32, msg: String, details: String) -> Self {
        CniError { code, msg, details }
    }

    pub fn to_json(&self, version: &str) -> Value {
        json!({
            "cniVersion": version,
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
        })
    }
}

pub type CniResult<T> = Result<T, CniError>;

/// An interface of an ADD result.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_path: Option<String>,
    #[serde(default, rename = "pciID", skip_serializing_if = "Option::is_none")]
    pub pci_id: Option<String>,
}

/// An IP configuration of an ADD result (or of an IPAM plugin's, without `interface`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<u32>,
}

/// The result of ADD (the 1.x form; 0.4.0 is produced from it by [`AddResult::to_json`]).
/// Routes and DNS are kept as the IPAM plugin gave them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AddResult {
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    #[serde(default)]
    pub ips: Vec<IpConfig>,
    #[serde(default)]
    pub routes: Vec<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Value>,
}

impl AddResult {
    /// Reads a result (a prevResult, an IPAM plugin's output) of any supported version.
    pub fn from_json(v: &Value) -> CniResult<AddResult> {
        let mut v = v.clone();
        if let Some(ips) = v.get_mut("ips").and_then(Value::as_array_mut) {
            for ip in ips {
                if let Some(o) = ip.as_object_mut() {
                    o.remove("version");
                }
            }
        }
        if let Some(o) = v.as_object_mut() {
            o.remove("cniVersion");
        }
        serde_json::from_value(v).map_err(|e| CniError::new(Code::Decode, format!("result: {e}")))
    }

    /// The result in the form of `version`: 1.1.0 as is; 1.0.0 without the interface fields
    /// 1.1.0 added (mtu, socketPath, pciID); 0.4.0 with each IP's `version`.
    pub fn to_json(&self, version: &str) -> Value {
        let mut v = serde_json::to_value(self).expect("result serializes");
        v["cniVersion"] = json!(version);
        if version != "1.1.0" {
            for i in v["interfaces"].as_array_mut().into_iter().flatten() {
                if let Some(o) = i.as_object_mut() {
                    for k in ["mtu", "socketPath", "pciID"] {
                        o.remove(k);
                    }
                }
            }
        }
        if version == "0.4.0" {
            for ip in v["ips"].as_array_mut().into_iter().flatten() {
                let six = ip["address"].as_str().is_some_and(|a| a.contains(':'));
                ip["version"] = json!(if six { "6" } else { "4" });
            }
        }
        if v["dns"].is_null() {
            if let Some(o) = v.as_object_mut() {
                o.remove("dns");
            }
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_convert_between_versions() {
        let r = AddResult {
            interfaces: vec![Interface {
                name: "net1".into(),
                mac: Some("02:00:00:00:00:01".into()),
                mtu: Some(1500),
                sandbox: Some("/run/netns/a".into()),
                socket_path: Some("/run/torii/pods/a/net1.sock".into()),
                pci_id: None,
            }],
            ips: vec![IpConfig {
                address: "10.1.0.2/24".into(),
                gateway: Some("10.1.0.1".into()),
                interface: Some(0),
            }],
            routes: vec![json!({"dst": "0.0.0.0/0"})],
            dns: None,
        };
        let v11 = r.to_json("1.1.0");
        assert_eq!(
            v11["interfaces"][0]["socketPath"],
            "/run/torii/pods/a/net1.sock"
        );
        assert_eq!(v11["cniVersion"], "1.1.0");
        assert!(v11.get("dns").is_none());
        let v10 = r.to_json("1.0.0");
        assert!(v10["interfaces"][0].get("socketPath").is_none());
        assert!(v10["ips"][0].get("version").is_none());
        let v04 = r.to_json("0.4.0");
        assert_eq!(v04["ips"][0]["version"], "4");
        // Each form reads back to the same result (less what the older forms cannot carry).
        assert_eq!(AddResult::from_json(&v11).unwrap(), r);
        let back = AddResult::from_json(&v04).unwrap();
        assert_eq!(back.ips, r.ips);
        assert!(AddResult::from_json(&json!({"ips": "x"})).is_err());
    }

    #[test]
    fn errors_carry_the_spec_codes() {
        let e = CniError::new(Code::InvalidEnvironment, "CNI_IFNAME is not set");
        let v = e.to_json("1.1.0");
        assert_eq!(v["code"], 4);
        assert_eq!(v["details"], "CNI_IFNAME is not set");
        assert_eq!(CniError::new(Code::NotAvailable, "x").code, 50);
    }
}
