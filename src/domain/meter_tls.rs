//! The meter API's TLS material: which names its certificate carries, when it is renewed, and
//! how it is kept in a Secret (controller/meter_tls.rs does the I/O).
//!
//! By default the operator is its own small CA: a CA (ten years) and a serving certificate
//! (90 days, renewed 30 days before it expires, signed by the same CA) live in one Secret in
//! the operator's namespace, so every replica serves the same certificate. The CA certificate
//! (public) goes into each meter's container; the meter trusts it and nothing else (not the
//! system's roots) for the meter API. Renewing the serving certificate keeps the CA, so meters
//! already running keep verifying the operator (tests/meter_grants.rs). A Secret the admin provides
//! instead (cert-manager's `tls.crt`, `tls.key`, `ca.crt`) is read, never written.

use std::collections::BTreeMap;
use std::str::FromStr;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose};

/// The chart's Service in front of every replica's meter API.
pub const SERVICE: &str = "agentgate-meter-api";
pub const DEFAULT_SECRET: &str = "agentgate-meter-api-tls";
pub const CERT_KEY: &str = "tls.crt";
pub const KEY_KEY: &str = "tls.key";
pub const CA_CERT_KEY: &str = "ca.crt";
/// The CA's private key: only in a Secret the operator manages (it signs renewals with it).
pub const CA_KEY_KEY: &str = "ca.key";
pub const ANNOTATION_NOT_AFTER: &str = "agentgate.dev/not-after";
pub const ANNOTATION_NAMES: &str = "agentgate.dev/names";
pub const LABEL_MANAGED: &str = "agentgate.dev/managed-by";

const DAY: i64 = 86_400;
pub const CA_VALIDITY_SECONDS: i64 = 3650 * DAY;
pub const SERVING_VALIDITY_SECONDS: i64 = 90 * DAY;
/// A serving certificate with less than this left is renewed.
pub const RENEW_BEFORE_SECONDS: i64 = 30 * DAY;
/// Certificates start this much before they are made: a node whose clock is a little behind
/// still accepts them.
const BACKDATE_SECONDS: i64 = 3600;

/// How the meter API is served (`--meter-api-tls`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsMode {
    /// HTTPS with the operator's own CA, kept in a Secret it creates and renews (the default).
    Managed,
    /// HTTPS with a Secret the admin provides (`tls.crt`, `tls.key`, `ca.crt`; e.g. cert-manager).
    Provided,
    /// Plain HTTP, for development only: meters then need `--grant-insecure-http`.
    Off,
}

impl FromStr for TlsMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "managed" => Ok(TlsMode::Managed),
            "secret" => Ok(TlsMode::Provided),
            "off" => Ok(TlsMode::Off),
            other => Err(format!("{other:?} is not a meter API TLS mode (managed, secret or off)")),
        }
    }
}

/// Certificates and keys as PEM, with what the operator recorded about them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Material {
    pub ca_cert_pem: String,
    /// None in a provided Secret: the operator cannot renew it, its issuer does.
    pub ca_key_pem: Option<String>,
    pub cert_pem: String,
    pub key_pem: String,
    /// Unix seconds; None when not recorded (a provided Secret).
    pub not_after: Option<i64>,
    pub names: Vec<String>,
}

/// The names the serving certificate must carry: the host meters dial (the grant URL's) and the
/// Service's names in `namespace`, sorted.
pub fn names(grant_url: &str, namespace: &str) -> Result<Vec<String>, String> {
    let uri: http::Uri = grant_url.parse().map_err(|e| format!("the meter grant URL {grant_url:?}: {e}"))?;
    let host = uri.host().filter(|h| !h.is_empty()).ok_or_else(|| format!("the meter grant URL {grant_url:?} has no host"))?;
    let mut names = vec![
        host.trim_start_matches('[').trim_end_matches(']').to_string(),
        SERVICE.to_string(),
        format!("{SERVICE}.{namespace}"),
        format!("{SERVICE}.{namespace}.svc"),
        format!("{SERVICE}.{namespace}.svc.cluster.local"),
    ];
    names.sort();
    names.dedup();
    Ok(names)
}

fn at(unix: i64) -> Result<time::OffsetDateTime, String> {
    time::OffsetDateTime::from_unix_timestamp(unix).map_err(|e| format!("time {unix}: {e}"))
}

fn ca_params(now: i64) -> Result<CertificateParams, String> {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, "agentgate meter API CA");
    params.distinguished_name.push(DnType::OrganizationName, "agentgate");
    // It signs serving certificates only, never another CA.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.not_before = at(now - BACKDATE_SECONDS)?;
    params.not_after = at(now + CA_VALIDITY_SECONDS)?;
    Ok(params)
}

/// A new CA and a serving certificate for `names` signed by it.
pub fn fresh(names: &[String], now: i64) -> Result<Material, String> {
    let ca_key = KeyPair::generate().map_err(|e| format!("generating the CA key: {e}"))?;
    let ca_cert = ca_params(now)?.self_signed(&ca_key).map_err(|e| format!("signing the CA certificate: {e}"))?;
    serving(ca_cert.pem(), ca_key.serialize_pem(), names, now)
}

/// A new serving certificate for `names` from the same CA: meters that trust the CA keep
/// trusting the operator.
pub fn renewed(old: &Material, names: &[String], now: i64) -> Result<Material, String> {
    let ca_key = old.ca_key_pem.clone().ok_or("the Secret holds no CA key: its issuer renews it, not the operator")?;
    serving(old.ca_cert_pem.clone(), ca_key, names, now)
}

fn serving(ca_cert_pem: String, ca_key_pem: String, names: &[String], now: i64) -> Result<Material, String> {
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|e| format!("the CA key: {e}"))?;
    // The issuer is the CA's name, key usages and key: the same parameters as when it was made
    // (the validity is not part of them).
    let issuer = Issuer::new(ca_params(now)?, ca_key);
    let mut params = CertificateParams::new(names.to_vec()).map_err(|e| format!("the names {names:?}: {e}"))?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, SERVICE);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let not_after = now + SERVING_VALIDITY_SECONDS;
    params.not_before = at(now - BACKDATE_SECONDS)?;
    params.not_after = at(not_after)?;
    let key = KeyPair::generate().map_err(|e| format!("generating the serving key: {e}"))?;
    let cert = params.signed_by(&key, &issuer).map_err(|e| format!("signing the serving certificate: {e}"))?;
    Ok(Material {
        ca_cert_pem,
        ca_key_pem: Some(ca_key_pem),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        not_after: Some(not_after),
        names: names.to_vec(),
    })
}

/// Why a managed Secret's serving certificate must be replaced now, if it must.
pub fn renewal_due(material: &Material, names: &[String], now: i64) -> Option<String> {
    match material.not_after {
        None => Some("its expiry is not recorded".into()),
        Some(t) if t - now < RENEW_BEFORE_SECONDS => Some(format!("it expires at {t} (unix), within {RENEW_BEFORE_SECONDS} s")),
        Some(_) if material.names != names => Some(format!("it names {:?}, not {names:?}", material.names)),
        Some(_) => None,
    }
}

fn text(data: &BTreeMap<String, ByteString>, key: &str) -> Option<String> {
    data.get(key).and_then(|b| String::from_utf8(b.0.clone()).ok()).filter(|t| !t.trim().is_empty())
}

/// The material in a Secret: a managed one (with the CA key and the annotations) or a provided
/// one (`tls.crt`, `tls.key`, `ca.crt`). Errors name the missing key, never a value.
pub fn from_secret(secret: &Secret) -> Result<Material, String> {
    let data = secret.data.clone().unwrap_or_default();
    let name = secret.metadata.name.as_deref().unwrap_or_default();
    let need = |key: &str| text(&data, key).ok_or_else(|| format!("Secret {name} has no {key}"));
    let annotations = secret.metadata.annotations.clone().unwrap_or_default();
    Ok(Material {
        ca_cert_pem: need(CA_CERT_KEY).map_err(|e| format!("{e}: the meters need the CA certificate to verify the meter API"))?,
        ca_key_pem: text(&data, CA_KEY_KEY),
        cert_pem: need(CERT_KEY)?,
        key_pem: need(KEY_KEY)?,
        not_after: annotations.get(ANNOTATION_NOT_AFTER).and_then(|t| t.parse().ok()),
        names: annotations.get(ANNOTATION_NAMES).map(|n| n.split(',').map(str::to_string).collect()).unwrap_or_default(),
    })
}

/// The managed Secret holding `material`.
pub fn to_secret(name: &str, namespace: &str, material: &Material) -> Secret {
    let mut data = BTreeMap::from([
        (CA_CERT_KEY.to_string(), ByteString(material.ca_cert_pem.clone().into_bytes())),
        (CERT_KEY.to_string(), ByteString(material.cert_pem.clone().into_bytes())),
        (KEY_KEY.to_string(), ByteString(material.key_pem.clone().into_bytes())),
    ]);
    if let Some(key) = &material.ca_key_pem {
        data.insert(CA_KEY_KEY.to_string(), ByteString(key.clone().into_bytes()));
    }
    let mut annotations = BTreeMap::from([(ANNOTATION_NAMES.to_string(), material.names.join(","))]);
    if let Some(t) = material.not_after {
        annotations.insert(ANNOTATION_NOT_AFTER.to_string(), t.to_string());
    }
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            annotations: Some(annotations),
            labels: Some(BTreeMap::from([(LABEL_MANAGED.to_string(), "agentgate".to_string())])),
            ..ObjectMeta::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(data),
        ..Secret::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000;

    #[test]
    fn names_are_the_grant_urls_host_and_the_services() {
        let n = names("https://10.200.0.1:8444", "agentgate-system").unwrap();
        assert!(n.contains(&"10.200.0.1".to_string()) && n.contains(&"agentgate-meter-api.agentgate-system.svc".to_string()), "{n:?}");
        let n = names("https://agentgate-meter-api.ops.svc:8444", "ops").unwrap();
        assert_eq!(n.len(), 4, "the host is one of the Service's names: {n:?}");
        assert!(names("not a url", "ops").is_err());
    }

    #[test]
    fn renewal_keeps_the_ca_and_is_due_before_expiry_or_on_new_names() {
        let n = names("https://agentgate-meter-api.ops.svc:8444", "ops").unwrap();
        let first = fresh(&n, NOW).unwrap();
        assert_eq!(renewal_due(&first, &n, NOW), None);
        assert_eq!(renewal_due(&first, &n, NOW + SERVING_VALIDITY_SECONDS - RENEW_BEFORE_SECONDS - 1), None);
        assert!(renewal_due(&first, &n, NOW + SERVING_VALIDITY_SECONDS - RENEW_BEFORE_SECONDS + 1).is_some());
        let other = names("https://10.0.0.1:8444", "ops").unwrap();
        assert!(renewal_due(&first, &other, NOW).unwrap().contains("names"));
        let second = renewed(&first, &n, NOW + 60 * DAY).unwrap();
        assert_eq!((&second.ca_cert_pem, &second.ca_key_pem), (&first.ca_cert_pem, &first.ca_key_pem));
        assert_ne!(second.cert_pem, first.cert_pem);
        assert_eq!(second.not_after, Some(NOW + 60 * DAY + SERVING_VALIDITY_SECONDS));
    }

    #[test]
    fn a_secret_round_trips_and_a_provided_one_needs_its_ca() {
        let n = names("https://agentgate-meter-api.ops.svc:8444", "ops").unwrap();
        let material = fresh(&n, NOW).unwrap();
        let secret = to_secret(DEFAULT_SECRET, "ops", &material);
        assert_eq!(from_secret(&secret).unwrap(), material);
        let mut provided = secret.clone();
        provided.metadata.annotations = None;
        let data = provided.data.as_mut().unwrap();
        data.remove(CA_KEY_KEY);
        let read = from_secret(&provided).unwrap();
        assert_eq!((read.ca_key_pem, read.not_after), (None, None));
        assert!(renewed(&from_secret(&provided).unwrap(), &n, NOW).is_err(), "no CA key: not the operator's to renew");
        provided.data.as_mut().unwrap().remove(CA_CERT_KEY);
        let err = from_secret(&provided).unwrap_err();
        assert!(err.contains("has no ca.crt") && !err.contains("BEGIN"), "{err}");
    }
}
