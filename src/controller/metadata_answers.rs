//! Writes whose answer the operator reads no further than its metadata ask the apiserver for
//! that alone (`as=PartialObjectMetadata`, which every verb honours, as `kubectl get` uses it for
//! lists): the apiserver then encodes the object's metadata (managedFields included) instead of
//! the whole object (an agent Pod's spec with its meter sidecar; a job's spec and status after
//! each status write), and the operator decodes no more than it reads.

use kube::Api;
use kube::api::PostParams;
use kube::core::PartialObjectMeta;
use serde::Serialize;

/// The media type of an answer reduced to the object's metadata.
pub const METADATA_ONLY: &str = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1";

/// `request` with the answer asked for as metadata only.
pub fn metadata_only(mut request: http::Request<Vec<u8>>) -> http::Request<Vec<u8>> {
    request.headers_mut().insert(http::header::ACCEPT, http::HeaderValue::from_static(METADATA_ONLY));
    request
}

/// `Api::create`, answered with the created object's metadata only. Errors as `Api::create`'s
/// (a 409 is `kube::Error::Api` with code 409).
pub async fn create<K: kube::Resource + Serialize + Clone>(
    api: &Api<K>,
    params: &PostParams,
    object: &K,
) -> kube::Result<PartialObjectMeta<K>> {
    let body = serde_json::to_vec(object).map_err(kube::Error::SerdeError)?;
    let request = kube::core::Request::new(api.resource_url()).create(params, body).map_err(kube::Error::BuildRequest)?;
    api.clone().into_client().request(metadata_only(request)).await
}
