//! Weir's own Flight commands (messages in `protos/weir/v1/ml.proto`): nearest-neighbour
//! search as a DoGet ticket, point-in-time feature retrieval as a DoExchange.

use std::pin::Pin;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow_flight::FlightData;
use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::sql::Any;
use futures::{Stream, StreamExt, TryStreamExt};
use prost::Message;
use tonic::{Status, Streaming};
use weir_lake::Lake;
use weir_ml::MlError;
use weir_ml::search::{Query, SimilarRequest};

/// The generated messages (regenerate with ./protos/generate.sh).
#[allow(clippy::all, missing_docs)]
pub mod proto {
    include!("gen/weir.v1.rs");
}

pub const SIMILAR_LISTINGS: &str = "type.googleapis.com/weir.v1.SimilarListings";
pub const POINT_IN_TIME: &str = "type.googleapis.com/weir.v1.PointInTimeFeatures";

pub type FlightStream = Pin<Box<dyn Stream<Item = Result<FlightData, Status>> + Send>>;

fn ml_status(e: MlError) -> Status {
    match e {
        MlError::Request(m) => Status::invalid_argument(m),
        MlError::Missing(m) => Status::failed_precondition(m),
        MlError::Config(m) => Status::invalid_argument(m),
        other => Status::internal(other.to_string()),
    }
}

/// Wraps a message as the Any a client sends.
pub fn to_any(type_url: &str, message: &impl Message) -> Any {
    Any { type_url: type_url.to_string(), value: message.encode_to_vec().into() }
}

/// The SimilarListings ticket: one stream of results.
pub async fn similar(lake: &Lake, message: &Any) -> Result<FlightStream, Status> {
    let m = proto::SimilarListings::decode(message.value.clone())
        .map_err(|e| Status::invalid_argument(format!("malformed weir.v1.SimilarListings: {e}")))?;
    let query = match m.query {
        Some(proto::similar_listings::Query::ListingId(id)) => Query::Listing(id),
        Some(proto::similar_listings::Query::Vector(v)) => Query::Vector(v.values),
        None => return Err(Status::invalid_argument("weir.v1.SimilarListings needs a listing_id or a vector")),
    };
    let req = SimilarRequest {
        query,
        k: if m.k == 0 { 10 } else { m.k as usize },
        filter: Some(m.filter).filter(|f| !f.trim().is_empty()),
        columns: m.columns,
        exact: m.exact,
    };
    let ds = weir_ml::vectors::open(lake).await.map_err(ml_status)?.ok_or_else(|| {
        Status::failed_precondition(format!("{} is not built yet: run `weir features`", weir_ml::vectors::DATASET))
    })?;
    let batch = weir_ml::search::similar(&ds, &req).await.map_err(ml_status)?;
    tracing::debug!(k = req.k, rows = batch.num_rows(), "similar listings");
    Ok(encode(futures::stream::once(async move { Ok(batch) })))
}

fn encode(batches: impl Stream<Item = Result<RecordBatch, FlightError>> + Send + 'static) -> FlightStream {
    Box::pin(FlightDataEncoderBuilder::new().build(batches).map_err(|e| match e {
        FlightError::Tonic(s) => *s,
        other => Status::internal(other.to_string()),
    }))
}

/// A DoExchange: the first message's descriptor names the command; request batches in,
/// one answer batch out for each.
pub async fn exchange(lake: &Lake, mut input: Streaming<FlightData>) -> Result<FlightStream, Status> {
    let first = input
        .message()
        .await?
        .ok_or_else(|| Status::invalid_argument("an empty exchange: send a descriptor with a Weir command"))?;
    let cmd = first.flight_descriptor.as_ref().map(|d| d.cmd.clone()).unwrap_or_default();
    let any = Any::decode(cmd)
        .map_err(|e| Status::invalid_argument(format!("the exchange's descriptor is not a command: {e}")))?;
    if any.type_url != POINT_IN_TIME {
        return Err(Status::unimplemented(format!(
            "unsupported exchange {:?} (supported: {POINT_IN_TIME})",
            any.type_url
        )));
    }
    let m = proto::PointInTimeFeatures::decode(any.value)
        .map_err(|e| Status::invalid_argument(format!("malformed weir.v1.PointInTimeFeatures: {e}")))?;
    if !m.feature_set.is_empty() && m.feature_set != "listing_features" {
        return Err(Status::invalid_argument(format!(
            "unknown feature set {:?} (feature sets: listing_features)",
            m.feature_set
        )));
    }
    let store = Arc::new(weir_ml::pit::FeatureStore::open(lake).await.map_err(ml_status)?);
    // Clients send the descriptor alone (pyarrow) or with the schema: keep it only then.
    let head = (!first.data_header.is_empty()).then_some(first);
    let rest = futures::stream::iter(head.map(Ok)).chain(input.map_err(|s| FlightError::Tonic(Box::new(s)))).boxed();
    let requests = FlightRecordBatchStream::new_from_flight_data(rest);
    let answers = requests.then(move |batch| {
        let store = store.clone();
        async move {
            let batch = batch?;
            store.retrieve(&batch).await.map_err(|e| FlightError::Tonic(Box::new(ml_status(e))))
        }
    });
    Ok(encode(answers))
}
