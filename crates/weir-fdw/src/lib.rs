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
//! transfer. LIMIT, with its ORDER BY, only when safe (see [`limit_is_safe`]): the framework
//! offers it even when some WHERE clause was not translated and in joins, where pushing it
//! gives wrong results. Aggregates (count, sum, min, max, with GROUP BY) likewise only when
//! safe (see [`aggregate_is_safe`]).
//! Waits on the network happen in 100 ms slices with PostgreSQL's interrupt check between
//! them, so statement_timeout and cancel requests work against a stalled server.

use std::collections::HashMap;
use std::ffi::CStr;
use std::sync::Arc;
use std::time::Duration;

use arrow_array::cast::AsArray;
use arrow_array::types::{
    Date32Type, Decimal128Type, Float32Type, Float64Type, Int16Type, Int32Type, Int64Type, TimestampMicrosecondType,
};
use arrow_array::{
    Array, ArrayRef, BooleanArray, Date32Array, Decimal128Array, Float32Array, Float64Array, Int16Array, Int32Array,
    Int64Array, LargeStringArray, RecordBatch, StringArray, StringViewArray, TimestampMicrosecondArray,
};
use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::error::FlightError;
use arrow_flight::sql::client::FlightSqlServiceClient;
use arrow_flight::sql::CommandGetTables;
use arrow_schema::{DataType, Schema, TimeUnit};
use futures::StreamExt;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::{AnyNumeric, PgList, PgSqlErrorCode};
use supabase_wrappers::prelude::*;
use tokio::runtime::Runtime;
use tokio::sync::mpsc;
use tonic::transport::Channel;

pgrx::pg_module_magic!();

// Varlena headers and numeric digits are written in the little-endian layout.
#[cfg(target_endian = "big")]
compile_error!("weir_fdw writes PostgreSQL varlena headers for little-endian machines only");

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
type RelSizeFn = unsafe extern "C-unwind" fn(*mut pg_sys::PlannerInfo, *mut pg_sys::RelOptInfo, pg_sys::Oid);
static FRAMEWORK_REL_SIZE: std::sync::OnceLock<RelSizeFn> = std::sync::OnceLock::new();
type UpperPathsFn = unsafe extern "C-unwind" fn(
    *mut pg_sys::PlannerInfo,
    pg_sys::UpperRelationKind::Type,
    *mut pg_sys::RelOptInfo,
    *mut pg_sys::RelOptInfo,
    *mut std::ffi::c_void,
);
static FRAMEWORK_UPPER_PATHS: std::sync::OnceLock<UpperPathsFn> = std::sync::OnceLock::new();

/// The framework offers aggregate pushdown past WHERE clauses it could not translate (wrong
/// counts) and ignores HAVING; this wrapper lets it consider a pushdown only when
/// [`aggregate_is_safe`] holds.
#[pg_guard]
unsafe extern "C-unwind" fn guarded_upper_paths(
    root: *mut pg_sys::PlannerInfo,
    stage: pg_sys::UpperRelationKind::Type,
    input_rel: *mut pg_sys::RelOptInfo,
    output_rel: *mut pg_sys::RelOptInfo,
    extra: *mut std::ffi::c_void,
) {
    // SAFETY: PostgreSQL hands valid planner state; read only here.
    unsafe {
        if stage != pg_sys::UpperRelationKind::UPPERREL_GROUP_AGG || !aggregate_is_safe(root, input_rel, output_rel) {
            return;
        }
        if let Some(f) = FRAMEWORK_UPPER_PATHS.get() {
            f(root, stage, input_rel, output_rel, extra);
        }
    }
}

/// Whether grouping and aggregation may run on the server: the foreign table is the query's
/// only relation, every WHERE clause reaches the server ([`simple_clause`]), there is no
/// HAVING, and every output is a grouping column (not char(n), whose equality ignores
/// trailing spaces) or an aggregate whose result DataFusion computes exactly as PostgreSQL
/// does: count(*), count([DISTINCT] col), sum of smallint/integer/numeric(p ≤ 28, s), min/max
/// of integers, numeric, dates and timestamps.
unsafe fn aggregate_is_safe(
    root: *mut pg_sys::PlannerInfo,
    input_rel: *mut pg_sys::RelOptInfo,
    output_rel: *mut pg_sys::RelOptInfo,
) -> bool {
    // SAFETY: valid planner state, read only.
    unsafe {
        let q = (*root).parse;
        if (*input_rel).reloptkind != pg_sys::RelOptKind::RELOPT_BASEREL
            || !single_relation(q, input_rel)
            || !(*q).havingQual.is_null()
            || !(*q).groupingSets.is_null()
            || (*q).hasWindowFuncs
            || (*q).hasTargetSRFs
        {
            return false;
        }
        if !every_clause_sent(input_rel) {
            return false;
        }
        let target = (*output_rel).reltarget;
        if target.is_null() {
            return false;
        }
        let exprs = PgList::<pg_sys::Node>::from_pg((*target).exprs);
        let safe = exprs.iter_ptr().all(|e| {
            if let Some(var) = own_column(e, input_rel) {
                return (*var).vartype != pg_sys::BPCHAROID
                    && (plain_type((*var).vartype) || (*var).vartype == pg_sys::VARCHAROID);
            }
            if !pgrx::is_a(e, pg_sys::NodeTag::T_Aggref) {
                return false;
            }
            let agg = e.cast::<pg_sys::Aggref>();
            if !(*agg).aggfilter.is_null() || !(*agg).aggorder.is_null() || (*agg).aggvariadic {
                return false;
            }
            // Built-in aggregates only (OIDs below FirstNormalObjectId): a user's own `sum` is
            // not DataFusion's.
            let name = pg_sys::get_func_name((*agg).aggfnoid);
            if name.is_null() || (*agg).aggfnoid.to_u32() >= pg_sys::FirstNormalObjectId {
                return false;
            }
            let args = PgList::<pg_sys::TargetEntry>::from_pg((*agg).args);
            let (arg_type, precision) = match (args.len(), args.get_ptr(0)) {
                (0, _) => (None, None),
                (1, Some(te)) => match own_column((*te).expr.cast(), input_rel) {
                    // numeric(p, s) keeps p in the typmod's high half (after the varlena header).
                    Some(var) => (Some((*var).vartype), ((*var).vartypmod >= 4).then(|| ((*var).vartypmod - 4) >> 16)),
                    None => return false,
                },
                _ => return false,
            };
            let distinct = !(*agg).aggdistinct.is_null();
            match (CStr::from_ptr(name).to_bytes(), arg_type) {
                (b"count", None) => !distinct,
                (b"count", Some(_)) => true,
                (b"sum", Some(t)) if t == pg_sys::NUMERICOID => {
                    // DataFusion sums decimal(p, s) as decimal(min(p + 10, 38), s): exact only
                    // while p + 10 <= 38 (unconstrained numeric: not pushed).
                    !distinct && precision.is_some_and(|p| p <= 28)
                }
                (b"sum", Some(t)) => !distinct && [pg_sys::INT2OID, pg_sys::INT4OID].contains(&t),
                (b"min" | b"max", Some(t)) => ordered_type(t) && ![pg_sys::FLOAT4OID, pg_sys::FLOAT8OID].contains(&t),
                _ => false,
            }
        });
        drop(exprs);
        safe
    }
}

/// The query reads this one relation and nothing else.
unsafe fn single_relation(q: *mut pg_sys::Query, rel: *mut pg_sys::RelOptInfo) -> bool {
    // SAFETY: valid planner state, read only.
    unsafe {
        if (*q).jointree.is_null() || !(*q).setOperations.is_null() || (*q).commandType != pg_sys::CmdType::CMD_SELECT {
            return false;
        }
        let from = PgList::<pg_sys::Node>::from_pg((*(*q).jointree).fromlist);
        match (from.len(), from.get_ptr(0)) {
            (1, Some(n)) if pgrx::is_a(n, pg_sys::NodeTag::T_RangeTblRef) => {
                (*n.cast::<pg_sys::RangeTblRef>()).rtindex as u32 == (*rel).relid
            }
            _ => false,
        }
    }
}

/// The framework hands a query's LIMIT to every scan, even past WHERE clauses it could not
/// translate and in joins, where pushing it gives wrong results. This wrapper lets it see the
/// LIMIT only when [`limit_is_safe`] holds; `begin_scan` then also requires that every clause
/// it was given translated.
#[pg_guard]
unsafe extern "C-unwind" fn guarded_rel_size(
    root: *mut pg_sys::PlannerInfo,
    baserel: *mut pg_sys::RelOptInfo,
    foreigntableid: pg_sys::Oid,
) {
    // SAFETY: PostgreSQL hands a valid planner state; the LIMIT is restored before returning.
    unsafe {
        let parse = (*root).parse;
        let hidden = !(*parse).limitCount.is_null() && !limit_is_safe(root, baserel);
        let (count, offset) = ((*parse).limitCount, (*parse).limitOffset);
        if hidden {
            (*parse).limitCount = std::ptr::null_mut();
            (*parse).limitOffset = std::ptr::null_mut();
        }
        if let Some(f) = FRAMEWORK_REL_SIZE.get() {
            f(root, baserel, foreigntableid);
        }
        (*parse).limitCount = count;
        (*parse).limitOffset = offset;
    }
}

/// Types whose constants the framework hands over and whose order (for <, >, ORDER BY) is
/// the same in DataFusion; text is excluded from ordering (its order depends on the collation).
fn plain_type(t: pg_sys::Oid) -> bool {
    [pg_sys::BOOLOID, pg_sys::TEXTOID].contains(&t) || ordered_type(t)
}

fn ordered_type(t: pg_sys::Oid) -> bool {
    [
        pg_sys::INT2OID,
        pg_sys::INT4OID,
        pg_sys::INT8OID,
        pg_sys::FLOAT4OID,
        pg_sys::FLOAT8OID,
        pg_sys::NUMERICOID,
        pg_sys::DATEOID,
        pg_sys::TIMESTAMPOID,
        pg_sys::TIMESTAMPTZOID,
    ]
    .contains(&t)
}

/// A column of `baserel` itself (not a whole-row or system column, not wrapped in a cast).
unsafe fn own_column(node: *mut pg_sys::Node, baserel: *mut pg_sys::RelOptInfo) -> Option<*mut pg_sys::Var> {
    // SAFETY: `node` is a valid planner node.
    unsafe {
        if node.is_null() || !pgrx::is_a(node, pg_sys::NodeTag::T_Var) {
            return None;
        }
        let var = node.cast::<pg_sys::Var>();
        ((*var).varno as u32 == (*baserel).relid && (*var).varattno >= 1 && (*var).varlevelsup == 0).then_some(var)
    }
}

/// A WHERE clause of a form the framework turns into exactly one `Qual` (a column compared
/// with a constant, IN/NOT IN a constant list, IS [NOT] NULL).
unsafe fn simple_clause(clause: *mut pg_sys::Node, baserel: *mut pg_sys::RelOptInfo) -> bool {
    // SAFETY: `clause` is a valid expression node of the planner.
    unsafe {
        let opname = |opno: pg_sys::Oid| {
            let name = pg_sys::get_opname(opno);
            (!name.is_null()).then(|| CStr::from_ptr(name).to_string_lossy().into_owned())
        };
        if pgrx::is_a(clause, pg_sys::NodeTag::T_OpExpr) {
            let op = clause.cast::<pg_sys::OpExpr>();
            let (Some(c), Some(name)) = (column_and_constant((*op).args, baserel), opname((*op).opno)) else {
                return false;
            };
            match name.as_str() {
                "=" | "<>" => plain_type((*c).consttype),
                "<" | "<=" | ">" | ">=" => ordered_type((*c).consttype),
                "~~" | "!~~" => (*c).consttype == pg_sys::TEXTOID,
                _ => false,
            }
        } else if pgrx::is_a(clause, pg_sys::NodeTag::T_ScalarArrayOpExpr) {
            let op = clause.cast::<pg_sys::ScalarArrayOpExpr>();
            let (Some(c), Some(name)) = (column_and_constant((*op).args, baserel), opname((*op).opno)) else {
                return false;
            };
            plain_type(pg_sys::get_element_type((*c).consttype))
                && matches!((name.as_str(), (*op).useOr), ("=", true) | ("<>", false))
        } else if pgrx::is_a(clause, pg_sys::NodeTag::T_NullTest) {
            let t = clause.cast::<pg_sys::NullTest>();
            !(*t).argisrow && own_column((*t).arg.cast(), baserel).is_some()
        } else {
            false
        }
    }
}

/// Every WHERE clause on `rel` is one the framework hands to the scan (so none is left for
/// PostgreSQL to apply after a pushed LIMIT or aggregate).
unsafe fn every_clause_sent(rel: *mut pg_sys::RelOptInfo) -> bool {
    // SAFETY: valid planner state, read only.
    unsafe {
        let clauses = PgList::<pg_sys::RestrictInfo>::from_pg((*rel).baserestrictinfo);
        let sent = clauses.iter_ptr().all(|ri| simple_clause((*ri).clause.cast(), rel));
        sent
    }
}

/// The constant of an operator's two arguments when they are a column of `baserel`, then a
/// non-NULL constant (the form the framework hands over).
unsafe fn column_and_constant(args: *mut pg_sys::List, baserel: *mut pg_sys::RelOptInfo) -> Option<*mut pg_sys::Const> {
    // SAFETY: `args` is an operator's argument list.
    unsafe {
        let a = PgList::<pg_sys::Node>::from_pg(args);
        if a.len() != 2 {
            return None;
        }
        own_column(a.get_ptr(0)?, baserel)?;
        let c = a.get_ptr(1)?;
        (pgrx::is_a(c, pg_sys::NodeTag::T_Const) && !(*c.cast::<pg_sys::Const>()).constisnull)
            .then(|| c.cast::<pg_sys::Const>())
    }
}

/// Whether the query's LIMIT may be applied on the server: this table is the query's only
/// relation, nothing between the scan and the LIMIT changes the row count or order
/// (grouping, aggregates, window functions, DISTINCT, set operations, set-returning
/// functions, WITH TIES), every WHERE clause is one the framework hands over, and every
/// ORDER BY key is a plain column of an ordered type (so it can be pushed with the LIMIT).
unsafe fn limit_is_safe(root: *mut pg_sys::PlannerInfo, baserel: *mut pg_sys::RelOptInfo) -> bool {
    // SAFETY: valid planner state, read only.
    unsafe {
        let q = (*root).parse;
        if !single_relation(q, baserel)
            || (*q).hasAggs
            || (*q).hasWindowFuncs
            || (*q).hasTargetSRFs
            || !(*q).groupClause.is_null()
            || !(*q).groupingSets.is_null()
            || !(*q).havingQual.is_null()
            || !(*q).distinctClause.is_null()
            || !(*q).rowMarks.is_null()
            || (*q).limitOption != pg_sys::LimitOption::LIMIT_OPTION_COUNT
        {
            return false;
        }
        if !every_clause_sent(baserel) {
            return false;
        }
        let keys = PgList::<pg_sys::PathKey>::from_pg((*root).query_pathkeys);
        let ordered = keys.iter_ptr().all(|pk| {
            let ec = (*pk).pk_eclass;
            if (*ec).ec_has_volatile {
                return false;
            }
            // The member the framework picks: the first one of this relation, and it must be
            // a plain column.
            let members = PgList::<pg_sys::EquivalenceMember>::from_pg((*ec).ec_members);
            let first = members.iter_ptr().find(|em| pg_sys::bms_equal((**em).em_relids, (*baserel).relids));
            first
                .and_then(|em| own_column((*em).em_expr.cast(), baserel))
                .is_some_and(|var| ordered_type((*var).vartype))
        });
        ordered
    }
}

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
    rt: Arc<Runtime>,
    url: String,
    credentials: HashMap<String, String>,
    /// Batches read ahead by a task on the backend's runtime, while PostgreSQL converts the
    /// current one.
    rx: Option<mpsc::Receiver<Result<RecordBatch, FlightError>>>,
    prefetch: Option<tokio::task::AbortHandle>,
    batch: Option<RecordBatch>,
    /// For each target column, its column of the current batch.
    typed: Vec<Typed>,
    pos: usize,
    columns: Vec<Column>,
}

/// Batches a scan reads ahead of PostgreSQL.
const PREFETCH_BATCHES: usize = 4;

thread_local! {
    /// One runtime per backend (PostgreSQL backends are single-threaded processes).
    static RUNTIME: std::cell::OnceCell<Arc<Runtime>> = const { std::cell::OnceCell::new() };
    /// Authenticated clients by server URL and credentials, kept for the backend's life: a
    /// point lookup should not pay for a TCP connection, an HTTP/2 handshake and an auth
    /// round trip every time.
    static CLIENTS: std::cell::RefCell<HashMap<String, FlightSqlServiceClient<Channel>>> =
        std::cell::RefCell::new(HashMap::new());
}

/// The backend's runtime: one worker thread that reads the network while the backend converts
/// rows. Its threads block every signal, so PostgreSQL's handlers (statement_timeout, cancel)
/// always run on the backend's own thread.
fn runtime() -> Result<Arc<Runtime>, WeirFdwError> {
    RUNTIME.with(|cell| {
        if let Some(rt) = cell.get() {
            return Ok(rt.clone());
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(1)
            .enable_all()
            .on_thread_start(|| {
                // SAFETY: sigfillset initialises the set; pthread_sigmask only changes this thread.
                unsafe {
                    let mut all: libc::sigset_t = std::mem::zeroed();
                    libc::sigfillset(&mut all);
                    libc::pthread_sigmask(libc::SIG_BLOCK, &all, std::ptr::null_mut());
                }
            })
            .build()
            .map_err(|e| WeirFdwError::Other(format!("cannot start the network runtime: {e}")))?;
        let rt = Arc::new(rt);
        let _ = cell.set(rt.clone());
        Ok(rt)
    })
}

/// The key of a cached client: the URL and the credentials it authenticated with.
fn client_key(url: &str, credentials: &HashMap<String, String>) -> String {
    let mut parts: Vec<String> = credentials.iter().map(|(k, v)| format!("{k}={v}")).collect();
    parts.sort();
    format!("{url}\u{0}{}", parts.join("\u{0}"))
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

    /// The backend's client for this server and user: reused when one is cached, else
    /// connected and authenticated (the bool says which).
    fn connect(&mut self) -> Result<(FlightSqlServiceClient<Channel>, bool), WeirFdwError> {
        let key = client_key(&self.url, &self.credentials);
        if let Some(c) = CLIENTS.with(|m| m.borrow().get(&key).cloned()) {
            return Ok((c, true));
        }
        let url = self.url.clone();
        let endpoint = url.replacen("grpc+tls://", "https://", 1).replacen("grpc://", "http://", 1);
        let channel = self
            .wait(async {
                tonic::transport::Endpoint::from_shared(endpoint)?
                    .connect_timeout(Duration::from_secs(10))
                    .tcp_nodelay(true)
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
        CLIENTS.with(|m| m.borrow_mut().insert(key, client.clone()));
        Ok((client, false))
    }

    /// Forgets the cached client (its connection or token went stale).
    fn disconnect(&self) {
        let key = client_key(&self.url, &self.credentials);
        CLIENTS.with(|m| m.borrow_mut().remove(&key));
    }

    /// Runs one statement and starts reading its result ahead. A failure on a reused client
    /// (a restarted server forgets its tokens) is retried once on a fresh one.
    fn query(&mut self, sql: &str) -> Result<(), WeirFdwError> {
        let (client, reused) = self.connect()?;
        let stream = match self.start(client, sql) {
            Ok(s) => s,
            Err(_) if reused => {
                self.disconnect();
                let (client, _) = self.connect()?;
                self.start(client, sql)?
            }
            Err(e) => return Err(e),
        };
        let (tx, rx) = mpsc::channel(PREFETCH_BATCHES);
        let task = self.rt.spawn(async move {
            let mut stream = stream;
            while let Some(item) = stream.next().await {
                let failed = item.is_err();
                if tx.send(item).await.is_err() || failed {
                    break;
                }
            }
        });
        self.prefetch = Some(task.abort_handle());
        self.rx = Some(rx);
        Ok(())
    }

    fn start(
        &self,
        mut client: FlightSqlServiceClient<Channel>,
        sql: &str,
    ) -> Result<FlightRecordBatchStream, WeirFdwError> {
        let info = self.wait(client.execute(sql.to_string(), None)).map_err(server_err)?;
        let ticket = info
            .endpoint
            .first()
            .and_then(|e| e.ticket.clone())
            .ok_or_else(|| WeirFdwError::Server("no ticket in the answer".into()))?;
        self.wait(client.do_get(ticket)).map_err(server_err)
    }

    /// Stops reading ahead (the task ends and the server's stream is cancelled).
    fn stop(&mut self) {
        if let Some(task) = self.prefetch.take() {
            task.abort();
        }
        self.rx = None;
        self.batch = None;
    }
}

impl Drop for WeirFdw {
    fn drop(&mut self) {
        self.stop();
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

/// One column of the current batch, downcast once per batch so that a cell costs no dynamic
/// dispatch.
enum Typed {
    Bool(BooleanArray),
    I16(Int16Array),
    I32(Int32Array),
    I64(Int64Array),
    F32(Float32Array),
    F64(Float64Array),
    Utf8(StringArray),
    LargeUtf8(LargeStringArray),
    Utf8View(StringViewArray),
    Decimal(Decimal128Array, u8, i8),
    Date(Date32Array),
    Timestamp(TimestampMicrosecondArray, bool),
}

impl Typed {
    fn new(col: &ArrayRef, name: &str) -> Result<Typed, WeirFdwError> {
        let bad = |message: String| WeirFdwError::Column { column: name.to_string(), message };
        Ok(match col.data_type() {
            DataType::Boolean => Typed::Bool(col.as_boolean().clone()),
            DataType::Int16 => Typed::I16(col.as_primitive::<Int16Type>().clone()),
            DataType::Int32 => Typed::I32(col.as_primitive::<Int32Type>().clone()),
            DataType::Int64 => Typed::I64(col.as_primitive::<Int64Type>().clone()),
            DataType::Float32 => Typed::F32(col.as_primitive::<Float32Type>().clone()),
            DataType::Float64 => Typed::F64(col.as_primitive::<Float64Type>().clone()),
            DataType::Utf8 => Typed::Utf8(col.as_string::<i32>().clone()),
            DataType::LargeUtf8 => Typed::LargeUtf8(col.as_string::<i64>().clone()),
            DataType::Utf8View => Typed::Utf8View(col.as_string_view().clone()),
            DataType::Decimal128(p, s) => Typed::Decimal(col.as_primitive::<Decimal128Type>().clone(), *p, *s),
            DataType::Date32 => Typed::Date(col.as_primitive::<Date32Type>().clone()),
            DataType::Timestamp(TimeUnit::Microsecond, tz) => {
                Typed::Timestamp(col.as_primitive::<TimestampMicrosecondType>().clone(), tz.is_some())
            }
            DataType::Dictionary(_, v) if matches!(v.as_ref(), DataType::Utf8) => {
                let plain = arrow_cast::cast(col, &DataType::Utf8).map_err(|e| bad(e.to_string()))?;
                Typed::Utf8(plain.as_string::<i32>().clone())
            }
            other => return Err(bad(format!("the Arrow type {other} has no PostgreSQL mapping here"))),
        })
    }

    /// The value at `row` as a cell of PostgreSQL's type (None for NULL).
    fn cell(&self, row: usize, name: &str, arena: &mut RowArena) -> Result<Option<Cell>, WeirFdwError> {
        let bad = |message: String| WeirFdwError::Column { column: name.to_string(), message };
        macro_rules! value {
            ($a:expr) => {{
                if $a.is_null(row) {
                    return Ok(None);
                }
                $a.value(row)
            }};
        }
        Ok(Some(match self {
            Typed::Bool(a) => Cell::Bool(value!(a)),
            Typed::I16(a) => Cell::I16(value!(a)),
            Typed::I32(a) => Cell::I32(value!(a)),
            Typed::I64(a) => Cell::I64(value!(a)),
            Typed::F32(a) => Cell::F32(value!(a)),
            Typed::F64(a) => Cell::F64(value!(a)),
            Typed::Utf8(a) => arena.text(value!(a).as_bytes()),
            Typed::LargeUtf8(a) => arena.text(value!(a).as_bytes()),
            Typed::Utf8View(a) => arena.text(value!(a).as_bytes()),
            Typed::Decimal(a, p, s) => {
                let v = value!(a);
                match arena.numeric(v, *s) {
                    Some(n) => n,
                    None => {
                        // The text keeps the scale, so numeric keeps it too (12.30 stays 12.30).
                        let text = <Decimal128Type as arrow_array::types::DecimalType>::format_decimal(v, *p, *s);
                        Cell::Numeric(AnyNumeric::try_from(text.as_str()).map_err(|e| bad(e.to_string()))?)
                    }
                }
            }
            Typed::Date(a) => Cell::Date(pgrx::datum::Date::saturating_from_raw(value!(a) - PG_EPOCH_DAYS)),
            Typed::Timestamp(a, tz) => {
                let us = value!(a) - PG_EPOCH_MICROS;
                if *tz {
                    Cell::Timestamptz(
                        pgrx::datum::TimestampWithTimeZone::try_from(us).map_err(|e| bad(format!("{e:?}")))?,
                    )
                } else {
                    Cell::Timestamp(pgrx::datum::Timestamp::saturating_from_raw(us))
                }
            }
        }))
    }
}

/// PostgreSQL's numeric header bits (src/backend/utils/adt/numeric.c, short format).
const NUMERIC_SHORT: u16 = 0x8000;
const NUMERIC_SHORT_SIGN_MASK: u16 = 0x2000;
const NUMERIC_SHORT_DSCALE_SHIFT: u16 = 7;
const NUMERIC_SHORT_DSCALE_MAX: i8 = 63;
const NUMERIC_SHORT_WEIGHT_SIGN_MASK: u16 = 0x0040;
const NUMERIC_SHORT_WEIGHT_MASK: u16 = 0x003F;
const NBASE: u64 = 10_000;

/// Base-10000 digits of `n` × 10^-`scale` (most significant first, in `buf[start..]`) and
/// the weight of the first, stripped of leading and trailing zero digits as numeric.c's
/// make_result stores them; None when the aligned value does not fit 128 bits.
fn numeric_digits(n: u128, scale: u32, buf: &mut [u16; 12]) -> Option<(usize, i32)> {
    let pad = (4 - scale % 4) % 4;
    let mut n = n.checked_mul(10u128.pow(pad))?;
    let frac_groups = ((scale + pad) / 4) as i32;
    // Filled from the end: buf[start..] is most significant first.
    let mut start = buf.len();
    while n > u64::MAX as u128 {
        start -= 1;
        buf[start] = (n % NBASE as u128) as u16;
        n /= NBASE as u128;
    }
    let mut n = n as u64;
    while n > 0 {
        start -= 1;
        buf[start] = (n % NBASE) as u16;
        n /= NBASE;
    }
    let weight = (buf.len() - start) as i32 - 1 - frac_groups;
    Some((start, weight))
}

/// Memory for one row's varlena values (text, numeric), palloc'd in the memory context that
/// is current while the framework asks for a row: the executor's per-tuple context, reset
/// before the next row, as file_fdw does. The values reach the slot as plain pointers
/// (`Cell::Bytea`): no Rust allocation, no second copy, and nothing piles up in the
/// framework's scan-long context (where `Cell::String` and `Cell::Numeric` datums are copied
/// and only freed when the scan ends).
struct RowArena {
    next: *mut u8,
    left: usize,
}

/// Bytes the arena asks PostgreSQL for at a time: well inside the per-tuple context's first
/// block, so a row's values normally cost one palloc and no malloc.
const ARENA_CHUNK: usize = 2048;

impl RowArena {
    /// An empty arena for one row: it must not outlive the row (the context is reset).
    fn for_row() -> Self {
        RowArena { next: std::ptr::null_mut(), left: 0 }
    }

    /// `len` bytes, 8-aligned (a varlena needs 4).
    fn alloc(&mut self, len: usize) -> *mut u8 {
        let len = (len + 7) & !7;
        if len > self.left {
            let size = len.max(ARENA_CHUNK);
            // SAFETY: palloc returns MAXALIGNed memory of `size` bytes or raises an ERROR.
            self.next = unsafe { pg_sys::palloc(size) }.cast::<u8>();
            self.left = size;
        }
        let p = self.next;
        // SAFETY: `len <= left`, so the pointer stays inside the allocation.
        self.next = unsafe { p.add(len) };
        self.left -= len;
        p
    }

    /// A varlena with a 4-byte header and `payload` bytes, whose payload `fill` writes.
    fn varlena(&mut self, payload: usize, fill: impl FnOnce(&mut [u8])) -> Cell {
        let len = 4 + payload;
        let p = self.alloc(len);
        // SAFETY: `p` holds `len` bytes; SET_VARSIZE of a 4-byte header is `len << 2`.
        unsafe {
            p.cast::<u32>().write((len as u32) << 2);
            fill(std::slice::from_raw_parts_mut(p.add(4), payload));
        }
        Cell::Bytea(p.cast())
    }

    /// A text (or varchar, or char(n)) value: its bytes behind a varlena header.
    fn text(&mut self, bytes: &[u8]) -> Cell {
        self.varlena(bytes.len(), |out| out.copy_from_slice(bytes))
    }

    /// A Decimal128 value as a PostgreSQL numeric of the same display scale, built byte for
    /// byte as numeric.c's make_result builds it (short format), without the text round trip;
    /// None when it does not fit the short format (then the text path is used).
    fn numeric(&mut self, v: i128, scale: i8) -> Option<Cell> {
        if !(0..=NUMERIC_SHORT_DSCALE_MAX).contains(&scale) {
            return None;
        }
        let mut buf = [0u16; 12];
        let (start, weight) = numeric_digits(v.unsigned_abs(), scale as u32, &mut buf)?;
        // Trailing zero digits carry nothing: numeric drops them.
        let end = buf.len() - buf[start..].iter().rev().take_while(|&&d| d == 0).count();
        let digits = &buf[start..end];
        let (weight, negative) = if digits.is_empty() { (0, false) } else { (weight, v < 0) };
        if !(-64..=63).contains(&weight) {
            return None;
        }
        let mut header = NUMERIC_SHORT | ((scale as u16) << NUMERIC_SHORT_DSCALE_SHIFT);
        if negative {
            header |= NUMERIC_SHORT_SIGN_MASK;
        }
        if weight < 0 {
            header |= NUMERIC_SHORT_WEIGHT_SIGN_MASK;
        }
        header |= (weight as u16) & NUMERIC_SHORT_WEIGHT_MASK;
        Some(self.varlena(2 + 2 * digits.len(), |out| {
            out[..2].copy_from_slice(&header.to_ne_bytes());
            for (i, d) in digits.iter().enumerate() {
                out[2 + 2 * i..4 + 2 * i].copy_from_slice(&d.to_ne_bytes());
            }
        }))
    }
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
            rt: runtime()?,
            url,
            credentials: user_mapping_options(server.server_oid),
            rx: None,
            prefetch: None,
            batch: None,
            typed: vec![],
            pos: 0,
            columns: vec![],
        })
    }

    fn begin_scan(
        &mut self,
        quals: &[Qual],
        columns: &[Column],
        sorts: &[Sort],
        limit: &Option<Limit>,
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
        // The planner let the LIMIT through only when it is safe (guarded_rel_size); it still
        // needs every clause to have reached the server. The ORDER BY goes with it (the server
        // then returns the right first rows; PostgreSQL sorts them again).
        if let Some(limit) = limit.as_ref().filter(|l| l.count >= 0 && filters.len() == quals.len()) {
            if !sorts.is_empty() {
                let keys: Vec<String> = sorts
                    .iter()
                    .map(|s| {
                        let dir = if s.reversed { "DESC" } else { "ASC" };
                        let nulls = if s.nulls_first { "NULLS FIRST" } else { "NULLS LAST" };
                        format!("{} {dir} {nulls}", quote_ident(&s.field))
                    })
                    .collect();
                sql.push_str(" ORDER BY ");
                sql.push_str(&keys.join(", "));
            }
            sql.push_str(&format!(" LIMIT {}", limit.count.saturating_add(limit.offset.max(0))));
        }
        pgrx::debug1!("weir_fdw: {sql}");
        self.stop();
        self.pos = 0;
        self.query(&sql)
    }

    fn supported_aggregates(&self) -> Vec<AggregateKind> {
        // What the planner may offer; guarded_upper_paths narrows it by argument type.
        vec![
            AggregateKind::Count,
            AggregateKind::CountColumn,
            AggregateKind::Sum,
            AggregateKind::Min,
            AggregateKind::Max,
        ]
    }

    fn supports_group_by(&self) -> bool {
        true
    }

    fn begin_aggregate_scan(
        &mut self,
        aggregates: &[supabase_wrappers::prelude::Aggregate],
        group_by: &[Column],
        quals: &[Qual],
        options: &HashMap<String, String>,
    ) -> Result<(), WeirFdwError> {
        let table = require_option("table", options)?.to_string();
        let filters: Vec<String> = quals.iter().filter_map(translate).collect();
        if filters.len() != quals.len() {
            // The plan already replaced PostgreSQL's aggregate: counting without a clause
            // would be wrong, so this is an error, never a wrong answer.
            return Err(WeirFdwError::Other(
                "the aggregate was planned to run on the server, but a WHERE clause has no exact DataFusion spelling (a NaN or infinite float constant?); rewrite that clause".into(),
            ));
        }
        let mut items: Vec<String> = group_by.iter().map(|c| quote_ident(&c.name)).collect();
        let mut columns: Vec<Column> = group_by.to_vec();
        for (i, a) in aggregates.iter().enumerate() {
            let arg = a.column.as_ref().map(|c| quote_ident(&c.name));
            let expr = match (&a.kind, arg) {
                (AggregateKind::Count, _) => "count(*)".to_string(),
                (AggregateKind::CountColumn, Some(c)) if a.distinct => format!("count(DISTINCT {c})"),
                (AggregateKind::CountColumn, Some(c)) => format!("count({c})"),
                (AggregateKind::Sum, Some(c)) => format!("sum({c})"),
                (AggregateKind::Min, Some(c)) => format!("min({c})"),
                (AggregateKind::Max, Some(c)) => format!("max({c})"),
                (kind, _) => return Err(WeirFdwError::Other(format!("aggregate {kind:?} is not pushed down"))),
            };
            let alias = format!("weir_agg_{i}");
            items.push(format!("{expr} AS {alias}"));
            columns.push(Column { name: alias, num: group_by.len() + i + 1, type_oid: a.type_oid });
        }
        let mut sql = format!("SELECT {} FROM {table}", items.join(", "));
        if !filters.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&filters.join(" AND "));
        }
        if !group_by.is_empty() {
            sql.push_str(" GROUP BY ");
            sql.push_str(&group_by.iter().map(|c| quote_ident(&c.name)).collect::<Vec<_>>().join(", "));
        }
        pgrx::debug1!("weir_fdw: {sql}");
        self.columns = columns;
        self.stop();
        self.pos = 0;
        self.query(&sql)
    }

    fn iter_scan(&mut self, row: &mut Row) -> Result<Option<()>, WeirFdwError> {
        loop {
            if let Some(b) = &self.batch {
                if self.pos < b.num_rows() {
                    let mut arena = RowArena::for_row();
                    for (c, t) in self.columns.iter().zip(&self.typed) {
                        // The framework places cells by position (its target list) and reads
                        // `cols` only for its length: an empty name costs no allocation, where
                        // Row::push would copy the column name for every cell.
                        row.cols.push(String::new());
                        row.cells.push(t.cell(self.pos, &c.name, &mut arena)?);
                    }
                    self.pos += 1;
                    return Ok(Some(()));
                }
            }
            let Some(mut rx) = self.rx.take() else { return Ok(None) };
            let next = self.wait(rx.recv());
            self.rx = Some(rx);
            match next {
                None => {
                    self.stop();
                    return Ok(None);
                }
                Some(Ok(b)) => {
                    // Columns found and typed once per batch, not once per cell.
                    self.typed = self
                        .columns
                        .iter()
                        .map(|c| {
                            let col = b.column_by_name(&c.name).ok_or_else(|| WeirFdwError::Column {
                                column: c.name.clone(),
                                message: "not in the server's answer".into(),
                            })?;
                            Typed::new(col, &c.name)
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
        self.stop();
        Ok(())
    }

    fn import_foreign_schema(&mut self, stmt: ImportForeignSchemaStmt) -> Result<Vec<String>, WeirFdwError> {
        let (mut client, _) = self.connect()?;
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
        if let Some(upper) = routine.GetForeignUpperPaths {
            let _ = FRAMEWORK_UPPER_PATHS.set(upper);
            routine.GetForeignUpperPaths = Some(guarded_upper_paths);
        }
        if let Some(size) = routine.GetForeignRelSize {
            let _ = FRAMEWORK_REL_SIZE.set(size);
            routine.GetForeignRelSize = Some(guarded_rel_size);
        }
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
