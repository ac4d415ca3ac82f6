//! weir_fdw: PostgreSQL foreign tables whose scans run as Arrow Flight SQL queries against
//! `weir serve`.
//!
//! ```sql
//! CREATE EXTENSION weir_fdw;                       -- creates the wrapper `weir_fdw`
//! CREATE SERVER weir FOREIGN DATA WRAPPER weir_fdw OPTIONS (url 'grpc://127.0.0.1:50051');
//! CREATE USER MAPPING FOR CURRENT_USER SERVER weir OPTIONS (user 'analyst', password '…');
//! CREATE FOREIGN TABLE lake_ads_vw (listing_id bigint, …) SERVER weir OPTIONS (table 'gold.ads_vw');
//! IMPORT FOREIGN SCHEMA gold FROM SERVER weir INTO lake;
//! ```
//!
//! Pushed down: the columns a query needs, and WHERE clauses PostgreSQL hands over that mean
//! the same in DataFusion (=, <>, IN, IS [NOT] NULL, LIKE on any type; <, <=, >, >= on
//! numbers, dates and timestamps only: text ordering depends on the collation). PostgreSQL
//! re-checks every clause on the rows that come back, so a clause left out only costs
//! transfer. Never pushed: LIMIT and aggregates. The framework offers both even when some
//! WHERE clause was not translated or in joins, where pushing them gives wrong results.
//! Waits on the network happen in 100 ms slices with PostgreSQL's interrupt check between
//! them, so statement_timeout and cancel requests work against a stalled server.

use std::collections::HashMap;
use std::ffi::CStr;
use std::time::Duration;

use arrow_array::cast::AsArray;
use arrow_array::types::{Decimal128Type, Float32Type, Float64Type, Int16Type, Int32Type, Int64Type};
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::sql::client::FlightSqlServiceClient;
use arrow_flight::sql::CommandGetTables;
use arrow_schema::{DataType, Schema, TimeUnit};
use futures::StreamExt;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::{AnyNumeric, PgList, PgSqlErrorCode};
use supabase_wrappers::prelude::*;
use tonic::transport::Channel;

pgrx::pg_module_magic!();

pgrx::extension_sql!(
    r#"CREATE FOREIGN DATA WRAPPER weir_fdw HANDLER weir_fdw_handler VALIDATOR weir_fdw_validator;"#,
    name = "weir_fdw_wrapper",
    requires = [weir_fdw_handler, weir_fdw_validator]
);

/// The framework's own scan callbacks, wrapped by [`guarded_begin`] and [`guarded_end`].
static FRAMEWORK_BEGIN: std::sync::OnceLock<
    unsafe extern "C-unwind" fn(*mut pg_sys::ForeignScanState, std::ffi::c_int),
> = std::sync::OnceLock::new();
static FRAMEWORK_END: std::sync::OnceLock<unsafe extern "C-unwind" fn(*mut pg_sys::ForeignScanState)> =
    std::sync::OnceLock::new();

/// supabase-wrappers 0.1.28 keeps a scan's state behind the plan's `fdw_private` and frees it
/// when the scan ends, so running a cached plan a second time (a prepared statement on its
/// generic plan, PL/pgSQL) used freed memory and aborted the backend ("double free").
/// These wrappers clear the pointer when the scan ends and turn a second run into an error.
#[pg_guard]
unsafe extern "C-unwind" fn guarded_begin(node: *mut pg_sys::ForeignScanState, eflags: std::ffi::c_int) {
    // SAFETY: PostgreSQL hands a valid ForeignScanState whose plan is a ForeignScan.
    unsafe {
        let plan = (*node).ss.ps.plan as *mut pg_sys::ForeignScan;
        if (*plan).fdw_private.is_null() {
            pgrx::error!(
                "weir_fdw: this cached query plan has already run once and cannot run again; run the query unprepared, or SET plan_cache_mode = force_custom_plan for prepared statements with parameters"
            );
        }
        if let Some(begin) = FRAMEWORK_BEGIN.get() {
            begin(node, eflags);
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn guarded_end(node: *mut pg_sys::ForeignScanState) {
    // SAFETY: as above; after the framework's end the state is freed, so the plan must not
    // point at it any more.
    unsafe {
        if let Some(end) = FRAMEWORK_END.get() {
            end(node);
        }
        let plan = (*node).ss.ps.plan as *mut pg_sys::ForeignScan;
        (*plan).fdw_private = std::ptr::null_mut();
    }
}

/// Days from 1970-01-01 to PostgreSQL's epoch 2000-01-01.
const PG_EPOCH_DAYS: i32 = 10_957;
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

#[derive(Debug, thiserror::Error)]
pub enum WeirFdwError {
    #[error("weir_fdw: {0}")]
    Options(#[from] OptionsError),
    #[error("weir_fdw: cannot reach the Flight SQL server at {url}: {message}")]
    Connect { url: String, message: String },
    #[error("weir_fdw: the Flight SQL server answered: {0}")]
    Server(String),
    #[error("weir_fdw: column {column}: {message}")]
    Column { column: String, message: String },
    #[error("weir_fdw: {0}")]
    Other(String),
}

impl From<WeirFdwError> for ErrorReport {
    fn from(e: WeirFdwError) -> Self {
        ErrorReport::new(PgSqlErrorCode::ERRCODE_FDW_ERROR, e.to_string(), "")
    }
}

impl From<CreateRuntimeError> for WeirFdwError {
    fn from(e: CreateRuntimeError) -> Self {
        WeirFdwError::Other(e.to_string())
    }
}

fn server_err(e: impl std::fmt::Display) -> WeirFdwError {
    // tonic statuses print as "status: Unauthenticated, message: \"…\", …": keep the message.
    let text = e.to_string();
    let msg = text.split("message: \"").nth(1).and_then(|r| r.split("\", ").next()).map(str::to_string).unwrap_or(text);
    WeirFdwError::Server(msg)
}

#[wrappers_fdw(
    version = "0.1.0",
    author = "Weir",
    website = "https://example.invalid/weir",
    error_type = "WeirFdwError"
)]
pub(crate) struct WeirFdw {
    rt: Runtime,
    url: String,
    credentials: HashMap<String, String>,
    client: Option<FlightSqlServiceClient<Channel>>,
    stream: Option<FlightRecordBatchStream>,
    batch: Option<RecordBatch>,
    /// For each target column, its index in the current batch.
    index: Vec<usize>,
    pos: usize,
    columns: Vec<Column>,
}

/// The current user's mapping options for a server (user, password or token).
fn user_mapping_options(server_oid: pg_sys::Oid) -> HashMap<String, String> {
    let mut out = HashMap::new();
    // SAFETY: GetUserMapping returns a palloc'd mapping or raises an ERROR; its options are
    // a List of DefElem with string values.
    unsafe {
        let um = pg_sys::GetUserMapping(pg_sys::GetUserId(), server_oid);
        if um.is_null() {
            return out;
        }
        let list = PgList::<pg_sys::DefElem>::from_pg((*um).options);
        for d in list.iter_ptr() {
            let name = CStr::from_ptr((*d).defname).to_string_lossy().into_owned();
            let value = CStr::from_ptr(pg_sys::defGetString(d)).to_string_lossy().into_owned();
            out.insert(name, value);
        }
    }
    out
}

impl WeirFdw {
    /// Runs a future to completion in 100 ms slices, letting PostgreSQL act on a cancel or a
    /// statement_timeout between slices.
    fn wait<F: std::future::Future>(&self, fut: F) -> F::Output {
        let mut fut = std::pin::pin!(fut);
        loop {
            let step = self.rt.block_on(async { tokio::time::timeout(Duration::from_millis(100), fut.as_mut()).await });
            match step {
                Ok(v) => return v,
                Err(_) => {
                    pgrx::check_for_interrupts!();
                }
            }
        }
    }

    fn connect(&mut self) -> Result<FlightSqlServiceClient<Channel>, WeirFdwError> {
        if let Some(c) = &self.client {
            return Ok(c.clone());
        }
        let url = self.url.clone();
        let endpoint = url.replacen("grpc+tls://", "https://", 1).replacen("grpc://", "http://", 1);
        let channel = self
            .wait(async {
                tonic::transport::Endpoint::from_shared(endpoint)?
                    .connect_timeout(Duration::from_secs(10))
                    .connect()
                    .await
            })
            .map_err(|e| WeirFdwError::Connect { url: url.clone(), message: e.to_string() })?;
        let mut client = FlightSqlServiceClient::new(channel);
        if let Some(token) = self.credentials.get("token") {
            client.set_token(token.clone());
        } else if let Some(user) = self.credentials.get("user") {
            let password = self.credentials.get("password").cloned().unwrap_or_default();
            let user = user.clone();
            self.wait(client.handshake(&user, &password)).map_err(server_err)?;
        }
        self.client = Some(client.clone());
        Ok(client)
    }

    /// Runs one statement and keeps its result stream.
    fn query(&mut self, sql: &str) -> Result<(), WeirFdwError> {
        let mut client = self.connect()?;
        let info = self.wait(client.execute(sql.to_string(), None)).map_err(server_err)?;
        let ticket = info
            .endpoint
            .first()
            .and_then(|e| e.ticket.clone())
            .ok_or_else(|| WeirFdwError::Server("no ticket in the answer".into()))?;
        let stream = self.wait(client.do_get(ticket)).map_err(server_err)?;
        self.stream = Some(stream);
        Ok(())
    }
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A cell as a DataFusion literal; None when it has no exact spelling (then the clause is
/// left to PostgreSQL). `ordered` asks for types whose order means the same on both sides.
fn literal(cell: &Cell, ordered: bool) -> Option<String> {
    Some(match cell {
        Cell::Bool(b) if !ordered => b.to_string(),
        Cell::I8(v) => v.to_string(),
        Cell::I16(v) => v.to_string(),
        Cell::I32(v) => v.to_string(),
        Cell::I64(v) => v.to_string(),
        Cell::F32(v) if v.is_finite() => format!("CAST({v:?} AS REAL)"),
        Cell::F64(v) if v.is_finite() => format!("CAST({v:?} AS DOUBLE)"),
        Cell::Numeric(n) => n.to_string(),
        Cell::String(s) if !ordered => quote_literal(s),
        Cell::Date(d) => format!("CAST({} AS DATE)", quote_literal(&d.to_string())),
        Cell::Timestamptz(t) => {
            let micros = t.into_inner() + PG_EPOCH_MICROS;
            format!("arrow_cast({micros}, 'Timestamp(µs, \"UTC\")')")
        }
        Cell::Timestamp(t) => {
            let micros = t.into_inner() + PG_EPOCH_MICROS;
            format!("arrow_cast({micros}, 'Timestamp(µs)')")
        }
        _ => return None,
    })
}

/// One WHERE clause PostgreSQL handed over, as DataFusion SQL, when it means the same there.
fn translate(q: &Qual) -> Option<String> {
    if q.param.is_some() {
        return None;
    }
    let col = quote_ident(&q.field);
    match (&q.value, q.operator.as_str()) {
        (Value::Cell(Cell::String(s)), "is") if s == "null" => Some(format!("{col} IS NULL")),
        (Value::Cell(Cell::String(s)), "is not") if s == "null" => Some(format!("{col} IS NOT NULL")),
        (Value::Cell(Cell::Bool(b)), "is") => Some(format!("{col} IS {b}")),
        (Value::Cell(Cell::Bool(b)), "is not") => Some(format!("{col} IS NOT {b}")),
        (Value::Cell(c), op @ ("=" | "<>")) => Some(format!("{col} {op} {}", literal(c, false)?)),
        (Value::Cell(c), op @ ("<" | "<=" | ">" | ">=")) => Some(format!("{col} {op} {}", literal(c, true)?)),
        (Value::Cell(Cell::String(p)), "~~") => Some(format!("{col} LIKE {}", quote_literal(p))),
        (Value::Cell(Cell::String(p)), "!~~") => Some(format!("{col} NOT LIKE {}", quote_literal(p))),
        (Value::Array(items), "=") if q.use_or => {
            let lits: Option<Vec<String>> = items.iter().map(|c| literal(c, false)).collect();
            Some(format!("{col} IN ({})", lits?.join(", ")))
        }
        (Value::Array(items), "<>") if !q.use_or => {
            let lits: Option<Vec<String>> = items.iter().map(|c| literal(c, false)).collect();
            Some(format!("{col} NOT IN ({})", lits?.join(", ")))
        }
        _ => None,
    }
}

/// The value at `row` of an Arrow column as a cell of PostgreSQL's type.
fn cell(col: &ArrayRef, row: usize, name: &str) -> Result<Option<Cell>, WeirFdwError> {
    if col.is_null(row) {
        return Ok(None);
    }
    let bad = |message: String| WeirFdwError::Column { column: name.to_string(), message };
    Ok(Some(match col.data_type() {
        DataType::Boolean => Cell::Bool(col.as_boolean().value(row)),
        DataType::Int16 => Cell::I16(col.as_primitive::<Int16Type>().value(row)),
        DataType::Int32 => Cell::I32(col.as_primitive::<Int32Type>().value(row)),
        DataType::Int64 => Cell::I64(col.as_primitive::<Int64Type>().value(row)),
        DataType::Float32 => Cell::F32(col.as_primitive::<Float32Type>().value(row)),
        DataType::Float64 => Cell::F64(col.as_primitive::<Float64Type>().value(row)),
        DataType::Utf8 => Cell::String(col.as_string::<i32>().value(row).to_string()),
        DataType::LargeUtf8 => Cell::String(col.as_string::<i64>().value(row).to_string()),
        DataType::Utf8View => Cell::String(col.as_string_view().value(row).to_string()),
        DataType::Decimal128(p, s) => {
            let v = col.as_primitive::<Decimal128Type>().value(row);
            // The text keeps the scale, so numeric keeps it too (12.30 stays 12.30).
            let text = <Decimal128Type as arrow_array::types::DecimalType>::format_decimal(v, *p, *s);
            Cell::Numeric(AnyNumeric::try_from(text.as_str()).map_err(|e| bad(e.to_string()))?)
        }
        DataType::Date32 => {
            let days = col.as_primitive::<arrow_array::types::Date32Type>().value(row);
            Cell::Date(pgrx::datum::Date::saturating_from_raw(days - PG_EPOCH_DAYS))
        }
        DataType::Timestamp(TimeUnit::Microsecond, tz) => {
            let us = col.as_primitive::<arrow_array::types::TimestampMicrosecondType>().value(row) - PG_EPOCH_MICROS;
            if tz.is_some() {
                Cell::Timestamptz(pgrx::datum::TimestampWithTimeZone::try_from(us).map_err(|e| bad(format!("{e:?}")))?)
            } else {
                Cell::Timestamp(pgrx::datum::Timestamp::saturating_from_raw(us))
            }
        }
        DataType::Dictionary(_, _) => {
            let plain = arrow_cast::cast(col, &DataType::Utf8).map_err(|e| bad(e.to_string()))?;
            return cell(&plain, row, name);
        }
        other => return Err(bad(format!("the Arrow type {other} has no PostgreSQL mapping here"))),
    }))
}

/// The PostgreSQL type IMPORT FOREIGN SCHEMA gives an Arrow column.
fn pg_type(t: &DataType) -> Option<String> {
    Some(match t {
        DataType::Boolean => "boolean".into(),
        DataType::Int16 => "smallint".into(),
        DataType::Int32 => "integer".into(),
        DataType::Int64 => "bigint".into(),
        DataType::Float32 => "real".into(),
        DataType::Float64 => "double precision".into(),
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => "text".into(),
        DataType::Dictionary(_, v) if matches!(v.as_ref(), DataType::Utf8) => "text".into(),
        DataType::Decimal128(p, s) => format!("numeric({p},{s})"),
        DataType::Date32 => "date".into(),
        DataType::Timestamp(TimeUnit::Microsecond, Some(_)) => "timestamp with time zone".into(),
        DataType::Timestamp(TimeUnit::Microsecond, None) => "timestamp without time zone".into(),
        _ => return None,
    })
}

impl ForeignDataWrapper<WeirFdwError> for WeirFdw {
    fn new(server: ForeignServer) -> Result<Self, WeirFdwError> {
        let url = require_option("url", &server.options)?.to_string();
        Ok(WeirFdw {
            rt: create_async_runtime()?,
            url,
            credentials: user_mapping_options(server.server_oid),
            client: None,
            stream: None,
            batch: None,
            index: vec![],
            pos: 0,
            columns: vec![],
        })
    }

    fn begin_scan(
        &mut self,
        quals: &[Qual],
        columns: &[Column],
        _sorts: &[Sort],
        _limit: &Option<Limit>,
        options: &HashMap<String, String>,
    ) -> Result<(), WeirFdwError> {
        let table = require_option("table", options)?.to_string();
        self.columns = columns.to_vec();
        let projection = if columns.is_empty() {
            "1 AS weir_row".to_string()
        } else {
            columns.iter().map(|c| quote_ident(&c.name)).collect::<Vec<_>>().join(", ")
        };
        let filters: Vec<String> = quals.iter().filter_map(translate).collect();
        let mut sql = format!("SELECT {projection} FROM {table}");
        if !filters.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&filters.join(" AND "));
        }
        pgrx::debug1!("weir_fdw: {sql}");
        self.batch = None;
        self.pos = 0;
        self.query(&sql)
    }

    fn iter_scan(&mut self, row: &mut Row) -> Result<Option<()>, WeirFdwError> {
        loop {
            if let Some(b) = &self.batch {
                if self.pos < b.num_rows() {
                    for (c, &i) in self.columns.iter().zip(&self.index) {
                        row.push(&c.name, cell(b.column(i), self.pos, &c.name)?);
                    }
                    self.pos += 1;
                    return Ok(Some(()));
                }
            }
            let Some(mut stream) = self.stream.take() else { return Ok(None) };
            let next = self.wait(stream.next());
            self.stream = Some(stream);
            match next {
                None => {
                    self.stream = None;
                    return Ok(None);
                }
                Some(Ok(b)) => {
                    // Column positions once per batch, not once per cell.
                    self.index = self
                        .columns
                        .iter()
                        .map(|c| {
                            b.schema().index_of(&c.name).map_err(|_| WeirFdwError::Column {
                                column: c.name.clone(),
                                message: "not in the server's answer".into(),
                            })
                        })
                        .collect::<Result<_, _>>()?;
                    self.batch = Some(b);
                    self.pos = 0;
                }
                Some(Err(e)) => return Err(server_err(e)),
            }
        }
    }

    fn re_scan(&mut self) -> Result<(), WeirFdwError> {
        Err(WeirFdwError::Other("rescans are not supported; materialize the foreign table first".into()))
    }

    fn end_scan(&mut self) -> Result<(), WeirFdwError> {
        self.stream = None;
        self.batch = None;
        Ok(())
    }

    fn import_foreign_schema(&mut self, stmt: ImportForeignSchemaStmt) -> Result<Vec<String>, WeirFdwError> {
        let mut client = self.connect()?;
        let cmd = CommandGetTables {
            catalog: None,
            db_schema_filter_pattern: Some(stmt.remote_schema.clone()),
            table_name_filter_pattern: None,
            table_types: vec![],
            include_schema: true,
        };
        let info = self.wait(client.get_tables(cmd)).map_err(server_err)?;
        let ticket = info
            .endpoint
            .first()
            .and_then(|e| e.ticket.clone())
            .ok_or_else(|| WeirFdwError::Server("no ticket".into()))?;
        let mut stream = self.wait(client.do_get(ticket)).map_err(server_err)?;
        let mut out = Vec::new();
        while let Some(batch) = self.wait(stream.next()) {
            let batch = batch.map_err(server_err)?;
            let names =
                arrow_cast::cast(batch.column_by_name("table_name").unwrap(), &DataType::Utf8).map_err(server_err)?;
            let schemas =
                batch.column_by_name("table_schema").ok_or_else(|| WeirFdwError::Server("no table_schema".into()))?;
            let schemas = schemas.as_binary::<i32>();
            for i in 0..batch.num_rows() {
                let name = names.as_string::<i32>().value(i).to_string();
                let wanted = match stmt.list_type {
                    ImportSchemaType::FdwImportSchemaAll => true,
                    ImportSchemaType::FdwImportSchemaLimitTo => stmt.table_list.contains(&name),
                    ImportSchemaType::FdwImportSchemaExcept => !stmt.table_list.contains(&name),
                };
                if !wanted {
                    continue;
                }
                let schema: Schema =
                    arrow_ipc::convert::try_schema_from_ipc_buffer(schemas.value(i)).map_err(server_err)?;
                let mut cols = Vec::new();
                for f in schema.fields() {
                    let t = pg_type(f.data_type()).ok_or_else(|| WeirFdwError::Column {
                        column: format!("{}.{}", name, f.name()),
                        message: format!("the Arrow type {} has no PostgreSQL mapping here", f.data_type()),
                    })?;
                    cols.push(format!("{} {t}", quote_ident(f.name())));
                }
                out.push(format!(
                    "CREATE FOREIGN TABLE IF NOT EXISTS {}.{} ({}) SERVER {} OPTIONS (table {})",
                    quote_ident(&stmt.local_schema),
                    quote_ident(&name),
                    cols.join(", "),
                    quote_ident(&stmt.server_name),
                    quote_literal(&format!("{}.{}", stmt.remote_schema, name))
                ));
            }
        }
        Ok(out)
    }

    fn fdw_routine_hook(routine: &mut supabase_wrappers::FdwRoutine<pgrx::AllocatedByRust>) {
        if let Some(begin) = routine.BeginForeignScan {
            let _ = FRAMEWORK_BEGIN.set(begin);
            routine.BeginForeignScan = Some(guarded_begin);
        }
        if let Some(end) = routine.EndForeignScan {
            let _ = FRAMEWORK_END.set(end);
            routine.EndForeignScan = Some(guarded_end);
        }
    }

    fn validator(options: Vec<Option<String>>, catalog: Option<pg_sys::Oid>) -> Result<(), WeirFdwError> {
        if let Some(oid) = catalog {
            if oid == FOREIGN_SERVER_RELATION_ID {
                check_options_contain(&options, "url")?;
            } else if oid == FOREIGN_TABLE_RELATION_ID {
                check_options_contain(&options, "table")?;
            }
        }
        Ok(())
    }
}
