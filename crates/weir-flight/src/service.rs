//! The Flight SQL service: statements, prepared statements with parameters, catalog
//! metadata, SqlInfo, and basic-auth handshakes that hand out bearer tokens.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use arrow::array::RecordBatch;
use arrow::datatypes::{Field, Schema, SchemaRef};
use arrow::ipc::writer::IpcWriteOptions;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::sql::metadata::{SqlInfoData, SqlInfoDataBuilder};
use arrow_flight::sql::server::{FlightSqlService, PeekableFlightDataStream};
use arrow_flight::sql::{
    ActionClosePreparedStatementRequest, ActionCreatePreparedStatementRequest, ActionCreatePreparedStatementResult,
    Any, CommandGetCatalogs, CommandGetDbSchemas, CommandGetSqlInfo, CommandGetTableTypes, CommandGetTables,
    CommandPreparedStatementQuery, CommandStatementQuery, DoPutPreparedStatementResult, ProstMessageExt, SqlInfo,
    TicketStatementQuery,
};
use arrow_flight::{
    FlightDescriptor, FlightEndpoint, FlightInfo, HandshakeRequest, HandshakeResponse, IpcMessage, SchemaAsIpc, Ticket,
};
use base64::Engine;
use datafusion::common::{ParamValues, ScalarValue};
use datafusion::error::DataFusionError;
use datafusion::prelude::{DataFrame, SessionContext};
use futures::{Stream, TryStreamExt};
use prost::Message;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};

use crate::{Catalog, ServeError};

/// Who may connect: users for the handshake, standing tokens, anonymous access.
#[derive(Debug, Default)]
pub struct Auth {
    users: HashMap<String, String>,
    tokens: Mutex<HashSet<String>>,
    anonymous: bool,
}

impl Auth {
    pub fn new(settings: &weir_core::ServeSettings) -> Result<Self, ServeError> {
        if settings.users.is_empty() && settings.tokens.is_empty() && !settings.anonymous {
            return Err(ServeError::Config(
                "no way to connect: add [[serve.users]] or serve.tokens to weir.toml (or WEIR_SERVE_TOKEN), or set serve.anonymous = true".into(),
            ));
        }
        Ok(Auth {
            users: settings.users.iter().map(|u| (u.name.clone(), u.password.clone())).collect(),
            tokens: Mutex::new(settings.tokens.iter().cloned().collect()),
            anonymous: settings.anonymous,
        })
    }

    fn check(&self, metadata: &MetadataMap) -> Result<(), Status> {
        let header = metadata.get("authorization").and_then(|v| v.to_str().ok());
        match header.and_then(|h| h.strip_prefix("Bearer ")) {
            Some(token) if self.tokens.lock().expect("auth lock").contains(token.trim()) => Ok(()),
            Some(_) => Err(Status::unauthenticated("invalid bearer token: authenticate again with the handshake")),
            None if self.anonymous => Ok(()),
            None => Err(Status::unauthenticated(
                "authentication required: use the Flight handshake with basic credentials, then the bearer token",
            )),
        }
    }

    /// Basic credentials → a new bearer token.
    fn handshake(&self, metadata: &MetadataMap) -> Result<Option<String>, Status> {
        let header = metadata.get("authorization").and_then(|v| v.to_str().ok());
        let Some(basic) = header.and_then(|h| h.strip_prefix("Basic ")) else {
            if self.anonymous {
                return Ok(None);
            }
            return Err(Status::unauthenticated("the handshake needs basic credentials (user and password)"));
        };
        // Clients differ on padding (the Go client omits it): accept both.
        let engine = base64::engine::GeneralPurpose::new(
            &base64::alphabet::STANDARD,
            base64::engine::GeneralPurposeConfig::new()
                .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
        );
        let decoded = engine
            .decode(basic.trim())
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(|| Status::invalid_argument("malformed basic credentials"))?;
        let (user, password) =
            decoded.split_once(':').ok_or_else(|| Status::invalid_argument("malformed basic credentials"))?;
        match self.users.get(user) {
            Some(p) if constant_time_eq(p.as_bytes(), password.as_bytes()) => {
                let token = uuid::Uuid::new_v4().simple().to_string();
                self.tokens.lock().expect("auth lock").insert(token.clone());
                tracing::info!(user, "handshake: token issued");
                Ok(Some(token))
            }
            _ => Err(Status::unauthenticated(format!("wrong user or password for {user:?}"))),
        }
    }
}

/// JDBC/ADBC-style `?` placeholders as DataFusion's `$1, $2, …` (outside quotes and comments).
pub fn numbered_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut n = 0;
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' | '"' => {
                out.push(c);
                for d in chars.by_ref() {
                    out.push(d);
                    if d == c {
                        break;
                    }
                }
            }
            '-' if chars.peek() == Some(&'-') => {
                out.push(c);
                for d in chars.by_ref() {
                    out.push(d);
                    if d == '\n' {
                        break;
                    }
                }
            }
            '/' if chars.peek() == Some(&'*') => {
                out.push(c);
                let mut prev = ' ';
                for d in chars.by_ref() {
                    out.push(d);
                    if prev == '*' && d == '/' {
                        break;
                    }
                    prev = d;
                }
            }
            '?' => {
                n += 1;
                out.push_str(&format!("${n}"));
            }
            _ => out.push(c),
        }
    }
    out
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Debug, Clone)]
struct Prepared {
    sql: String,
    params: Option<Vec<ScalarValue>>,
}

pub struct WeirFlightSql {
    catalog: Arc<Catalog>,
    auth: Auth,
    prepared: Mutex<HashMap<Vec<u8>, Prepared>>,
    sql_info: SqlInfoData,
}

impl std::fmt::Debug for WeirFlightSql {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeirFlightSql").field("catalog", &self.catalog).finish()
    }
}

type DoGetStream = Pin<Box<dyn Stream<Item = Result<arrow_flight::FlightData, Status>> + Send + 'static>>;

fn status(e: ServeError) -> Status {
    match e {
        ServeError::DataFusion(e) => df_status(&e, None),
        other => Status::internal(other.to_string()),
    }
}

fn df_status(e: &DataFusionError, limit: Option<usize>) -> Status {
    let text = e.to_string();
    if matches!(e.find_root(), DataFusionError::ResourcesExhausted(_)) || text.contains("Resources exhausted") {
        let limit = limit.map(|b| format!(" of {} MiB", b >> 20)).unwrap_or_default();
        return Status::resource_exhausted(format!(
            "the query needs more than the per-query memory limit{limit}: {text}"
        ));
    }
    match e.find_root() {
        DataFusionError::Plan(_) | DataFusionError::SQL(..) | DataFusionError::SchemaError(..) => {
            Status::invalid_argument(text)
        }
        _ => Status::internal(text),
    }
}

fn ipc_schema(schema: &Schema) -> Result<bytes::Bytes, Status> {
    let message: Result<IpcMessage, _> = SchemaAsIpc::new(schema, &IpcWriteOptions::default()).try_into();
    message.map(|m| m.0).map_err(|e| Status::internal(format!("encoding a schema: {e}")))
}

/// The schema as the encoder sends it: dictionary columns (Delta partition values) arrive as
/// their plain value type.
fn flight_schema(schema: &Schema) -> Schema {
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .map(|f| match f.data_type() {
            arrow::datatypes::DataType::Dictionary(_, value) => {
                Field::new(f.name(), value.as_ref().clone(), f.is_nullable()).with_metadata(f.metadata().clone())
            }
            _ => f.as_ref().clone(),
        })
        .collect();
    Schema::new_with_metadata(fields, schema.metadata().clone())
}

fn info(schema: &Schema, ticket: Vec<u8>, descriptor: FlightDescriptor) -> Result<FlightInfo, Status> {
    Ok(FlightInfo::new()
        .try_with_schema(&flight_schema(schema))
        .map_err(|e| Status::internal(format!("encoding a schema: {e}")))?
        .with_endpoint(FlightEndpoint::new().with_ticket(Ticket::new(ticket)))
        .with_descriptor(descriptor))
}

fn batch_stream(schema: SchemaRef, batch: RecordBatch) -> DoGetStream {
    let stream = futures::stream::once(async move { Ok(batch) });
    Box::pin(
        FlightDataEncoderBuilder::new().with_schema(schema).build(stream).map_err(|e| Status::internal(e.to_string())),
    )
}

impl WeirFlightSql {
    pub fn new(catalog: Arc<Catalog>, auth: Auth) -> Self {
        let mut b = SqlInfoDataBuilder::new();
        b.append(SqlInfo::FlightSqlServerName, "weir");
        b.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
        b.append(SqlInfo::FlightSqlServerArrowVersion, "58");
        b.append(SqlInfo::FlightSqlServerReadOnly, true);
        b.append(SqlInfo::FlightSqlServerSql, true);
        b.append(SqlInfo::FlightSqlServerSubstrait, false);
        b.append(SqlInfo::FlightSqlServerTransaction, 0i32);
        b.append(SqlInfo::FlightSqlServerCancel, false);
        let sql_info = b.build().expect("static SqlInfo");
        WeirFlightSql { catalog, auth, prepared: Mutex::new(HashMap::new()), sql_info }
    }

    async fn plan(&self, sql: &str, params: Option<&[ScalarValue]>) -> Result<(SessionContext, DataFrame), Status> {
        let clock = std::time::Instant::now();
        let ctx = self.catalog.session().await.map_err(status)?;
        let session = clock.elapsed();
        let limit = Some(self.catalog.memory_limit());
        let df = ctx.sql(&numbered_placeholders(sql)).await.map_err(|e| df_status(&e, limit))?;
        tracing::trace!(
            session = session.as_secs_f64(),
            sql = (clock.elapsed() - session).as_secs_f64(),
            "query planned"
        );
        let df = match params {
            Some(p) if !p.is_empty() => df
                .with_param_values(ParamValues::List(p.iter().cloned().map(Into::into).collect()))
                .map_err(|e| df_status(&e, limit))?,
            _ => df,
        };
        Ok((ctx, df))
    }

    /// Runs the query and streams its batches as they come (never the whole result).
    async fn execute(&self, sql: &str, params: Option<&[ScalarValue]>) -> Result<DoGetStream, Status> {
        let (_ctx, df) = self.plan(sql, params).await?;
        let limit = Some(self.catalog.memory_limit());
        let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
        let clock = std::time::Instant::now();
        let stream = df.execute_stream().await.map_err(|e| df_status(&e, limit))?;
        tracing::debug!(sql = %sql, seconds = clock.elapsed().as_secs_f64(), "query started");
        let batches = stream.map_err(move |e| FlightError::Tonic(Box::new(df_status(&e, limit))));
        let encoded = FlightDataEncoderBuilder::new().with_schema(schema).build(batches).map_err(|e| match e {
            FlightError::Tonic(s) => *s,
            other => Status::internal(other.to_string()),
        });
        Ok(Box::pin(QueryStream { inner: Box::pin(encoded), sql: sql.to_string(), messages: 0, done: false }))
    }

    fn prepared(&self, handle: &[u8]) -> Result<Prepared, Status> {
        self.prepared
            .lock()
            .expect("prepared lock")
            .get(handle)
            .cloned()
            .ok_or_else(|| Status::not_found("unknown prepared statement handle (closed, or from another server)"))
    }
}

/// A query's result stream. A client that cancels its DoGet (pyarrow's `reader.cancel()`,
/// ADBC's cancel, a dropped connection) drops this stream, which drops DataFusion's and stops
/// the query's execution; the drop is logged so that it is visible.
struct QueryStream {
    inner: DoGetStream,
    sql: String,
    messages: u64,
    done: bool,
}

impl Stream for QueryStream {
    type Item = Result<arrow_flight::FlightData, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Self::Item>> {
        let next = self.inner.as_mut().poll_next(cx);
        match &next {
            std::task::Poll::Ready(Some(Ok(_))) => self.messages += 1,
            std::task::Poll::Ready(_) => self.done = true,
            std::task::Poll::Pending => {}
        }
        next
    }
}

impl Drop for QueryStream {
    fn drop(&mut self) {
        if !self.done {
            tracing::info!(sql = %self.sql, messages = self.messages, "query cancelled by the client; execution stopped");
        }
    }
}

#[tonic::async_trait]
impl FlightSqlService for WeirFlightSql {
    type FlightService = WeirFlightSql;

    async fn do_handshake(
        &self,
        request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Pin<Box<dyn Stream<Item = Result<HandshakeResponse, Status>> + Send>>>, Status> {
        let token = self.auth.handshake(request.metadata())?;
        let payload = token.clone().unwrap_or_default();
        let out = futures::stream::iter(vec![Ok(HandshakeResponse { protocol_version: 0, payload: payload.into() })]);
        let mut response: Response<Pin<Box<dyn Stream<Item = Result<HandshakeResponse, Status>> + Send>>> =
            Response::new(Box::pin(out));
        if let Some(t) = token {
            let value = format!("Bearer {t}").parse().map_err(|_| Status::internal("token header"))?;
            response.metadata_mut().insert("authorization", value);
        }
        Ok(response)
    }

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.auth.check(request.metadata())?;
        let (_ctx, df) = self.plan(&query.query, None).await?;
        let schema = df.schema().as_arrow().clone();
        let ticket = TicketStatementQuery { statement_handle: query.query.into_bytes().into() };
        Ok(Response::new(info(&schema, ticket.as_any().encode_to_vec(), request.into_inner())?))
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.auth.check(request.metadata())?;
        let sql = String::from_utf8(ticket.statement_handle.to_vec())
            .map_err(|_| Status::invalid_argument("the statement ticket is not UTF-8"))?;
        Ok(Response::new(self.execute(&sql, None).await?))
    }

    async fn do_action_create_prepared_statement(
        &self,
        query: ActionCreatePreparedStatementRequest,
        request: Request<arrow_flight::Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        self.auth.check(request.metadata())?;
        let ctx = self.catalog.session().await.map_err(status)?;
        let plan = ctx
            .state()
            .create_logical_plan(&numbered_placeholders(&query.query))
            .await
            .map_err(|e| df_status(&e, None))?;
        let types = plan.get_parameter_types().map_err(|e| df_status(&e, None))?;
        let mut names: Vec<&String> = types.keys().collect();
        names.sort_by_key(|n| n.trim_start_matches('$').parse::<usize>().unwrap_or(usize::MAX));
        let params = Schema::new(
            names
                .iter()
                .map(|n| Field::new(n.as_str(), types[*n].clone().unwrap_or(arrow::datatypes::DataType::Null), true))
                .collect::<Vec<_>>(),
        );
        let dataset = plan.schema().as_arrow().clone();
        let handle = uuid::Uuid::new_v4().as_bytes().to_vec();
        self.prepared
            .lock()
            .expect("prepared lock")
            .insert(handle.clone(), Prepared { sql: query.query, params: None });
        Ok(ActionCreatePreparedStatementResult {
            prepared_statement_handle: handle.into(),
            dataset_schema: ipc_schema(&flight_schema(&dataset))?,
            parameter_schema: ipc_schema(&params)?,
        })
    }

    async fn do_put_prepared_statement_query(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<DoPutPreparedStatementResult, Status> {
        self.auth.check(request.metadata())?;
        let handle = query.prepared_statement_handle.to_vec();
        let mut prepared = self.prepared(&handle)?;
        let stream = request.into_inner().map_err(FlightError::from);
        let batches: Vec<RecordBatch> = arrow_flight::decode::FlightRecordBatchStream::new_from_flight_data(stream)
            .try_collect()
            .await
            .map_err(|e| Status::invalid_argument(format!("reading the parameters: {e}")))?;
        let Some(batch) = batches.iter().find(|b| b.num_rows() > 0) else {
            return Err(Status::invalid_argument("no parameter values were sent"));
        };
        if batch.num_rows() > 1 {
            return Err(Status::invalid_argument("one row of parameters at a time, please"));
        }
        let values = batch
            .columns()
            .iter()
            .map(|c| ScalarValue::try_from_array(c, 0))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Status::invalid_argument(format!("reading the parameters: {e}")))?;
        prepared.params = Some(values);
        self.prepared.lock().expect("prepared lock").insert(handle.clone(), prepared);
        Ok(DoPutPreparedStatementResult { prepared_statement_handle: Some(handle.into()) })
    }

    async fn get_flight_info_prepared_statement(
        &self,
        cmd: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.auth.check(request.metadata())?;
        let p = self.prepared(&cmd.prepared_statement_handle)?;
        let (_ctx, df) = self.plan(&p.sql, p.params.as_deref()).await?;
        let schema = df.schema().as_arrow().clone();
        Ok(Response::new(info(&schema, cmd.as_any().encode_to_vec(), request.into_inner())?))
    }

    async fn do_get_prepared_statement(
        &self,
        cmd: CommandPreparedStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.auth.check(request.metadata())?;
        let p = self.prepared(&cmd.prepared_statement_handle)?;
        Ok(Response::new(self.execute(&p.sql, p.params.as_deref()).await?))
    }

    async fn do_action_close_prepared_statement(
        &self,
        query: ActionClosePreparedStatementRequest,
        request: Request<arrow_flight::Action>,
    ) -> Result<(), Status> {
        self.auth.check(request.metadata())?;
        self.prepared.lock().expect("prepared lock").remove(query.prepared_statement_handle.as_ref());
        Ok(())
    }

    async fn get_flight_info_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.auth.check(request.metadata())?;
        let schema = query.into_builder().schema();
        Ok(Response::new(info(&schema, query.as_any().encode_to_vec(), request.into_inner())?))
    }

    async fn do_get_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.auth.check(request.metadata())?;
        let mut b = query.into_builder();
        b.append(weir_derive::session::CATALOG);
        let schema = b.schema();
        let batch = b.build().map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(batch_stream(schema, batch)))
    }

    async fn get_flight_info_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.auth.check(request.metadata())?;
        let schema = query.clone().into_builder().schema();
        Ok(Response::new(info(&schema, query.as_any().encode_to_vec(), request.into_inner())?))
    }

    async fn do_get_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.auth.check(request.metadata())?;
        let mut b = query.into_builder();
        for s in ["bronze", "gold", "public", "silver"] {
            b.append(weir_derive::session::CATALOG, s);
        }
        let schema = b.schema();
        let batch = b.build().map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(batch_stream(schema, batch)))
    }

    async fn get_flight_info_tables(
        &self,
        query: CommandGetTables,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.auth.check(request.metadata())?;
        let schema = query.clone().into_builder().schema();
        Ok(Response::new(info(&schema, query.as_any().encode_to_vec(), request.into_inner())?))
    }

    async fn do_get_tables(
        &self,
        query: CommandGetTables,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.auth.check(request.metadata())?;
        let mut b = query.into_builder();
        let mut entries = self.catalog.entries().await.map_err(status)?;
        entries.sort_by(|a, b| (&a.schema, &a.name).cmp(&(&b.schema, &b.name)));
        for e in entries {
            b.append(weir_derive::session::CATALOG, &e.schema, &e.name, e.kind, &e.arrow_schema)
                .map_err(|e| Status::internal(e.to_string()))?;
        }
        let schema = b.schema();
        let batch = b.build().map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(batch_stream(schema, batch)))
    }

    async fn get_flight_info_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.auth.check(request.metadata())?;
        let schema = Schema::new(vec![Field::new("table_type", arrow::datatypes::DataType::Utf8, false)]);
        Ok(Response::new(info(&schema, query.as_any().encode_to_vec(), request.into_inner())?))
    }

    async fn do_get_table_types(
        &self,
        _query: CommandGetTableTypes,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.auth.check(request.metadata())?;
        let schema = Arc::new(Schema::new(vec![Field::new("table_type", arrow::datatypes::DataType::Utf8, false)]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(arrow::array::StringArray::from(vec!["TABLE", "VIEW"]))],
        )
        .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(batch_stream(schema, batch)))
    }

    async fn get_flight_info_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.auth.check(request.metadata())?;
        let schema = query.clone().into_builder(&self.sql_info).schema();
        Ok(Response::new(info(&schema, query.as_any().encode_to_vec(), request.into_inner())?))
    }

    async fn do_get_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.auth.check(request.metadata())?;
        let b = query.into_builder(&self.sql_info);
        let schema = b.schema();
        let batch = b.build().map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(batch_stream(schema, batch)))
    }

    async fn do_get_fallback(
        &self,
        request: Request<Ticket>,
        message: Any,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.auth.check(request.metadata())?;
        match message.type_url.as_str() {
            crate::ml::SIMILAR_LISTINGS => Ok(Response::new(crate::ml::similar(self.catalog.lake(), &message).await?)),
            other => Err(Status::unimplemented(format!(
                "unsupported ticket {other} (Weir's own: {})",
                crate::ml::SIMILAR_LISTINGS
            ))),
        }
    }

    async fn do_exchange_fallback(
        &self,
        request: Request<Streaming<arrow_flight::FlightData>>,
    ) -> Result<Response<<Self as FlightService>::DoExchangeStream>, Status> {
        self.auth.check(request.metadata())?;
        Ok(Response::new(crate::ml::exchange(self.catalog.lake(), request.into_inner()).await?))
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}
