//! The namespace's side of the meter's configuration (domain/meter_sidecar.rs): what its keys
//! Secret holds, read when an attempt's Pods are created.

use k8s_openapi::api::core::v1::Secret;
use kube::Api;

use super::error::ApplyError;
use super::{Context, Result};
use crate::domain::meter_sidecar::NamespaceKeys;

/// What the namespace's meter keys Secret offers (key names and upstream annotations; its values
/// are dropped here and never logged), None when it does not exist or the operator may not read
/// it (the chart grants `get` on it by name in every namespace): the meter is then keyless, and the
/// job says so.
/// Read once per attempt start, not cached: no watch on every Secret's data is needed.
pub async fn of_namespace(ctx: &Context, namespace: &str) -> Result<Option<NamespaceKeys>> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    match api.get_opt(&ctx.settings.meter.keys_secret).await {
        Ok(secret) => Ok(secret.map(|s| {
            let data_keys = s.data.iter().flatten().map(|(k, _)| k.as_str()).chain(s.string_data.iter().flatten().map(|(k, _)| k.as_str()));
            NamespaceKeys::from_secret(data_keys, s.metadata.annotations.as_ref().unwrap_or(&Default::default()))
        })),
        Err(kube::Error::Api(s)) if s.code == 403 => Ok(None),
        Err(source) => {
            Err(ApplyError::GetMeterKeys { namespace: namespace.into(), secret: ctx.settings.meter.keys_secret.clone(), source }.into())
        }
    }
}
