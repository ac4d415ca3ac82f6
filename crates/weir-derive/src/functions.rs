//! PostgreSQL's numeric semantics in DataFusion, where the two differ.
//!
//! * Division. Arrow divides decimals at the dividend's scale + 4 and truncates; PostgreSQL
//!   (`select_div_scale` + `div_var`) picks a result scale per value, at least 16 significant
//!   digits and at least either input's scale, and rounds half away from zero there. Any later
//!   `round(…, n)` rounds *that* value, so the two can differ. [`PgArithmetic`] plans every `/`
//!   with a decimal operand as [`pg_div`], which computes PostgreSQL's value exactly and
//!   stores it at scale [`DIV_SCALE`] (or an input's scale, if larger).
//! * A value that does not fit its declared `numeric(p,s)`: PostgreSQL fails the statement
//!   ("numeric field overflow"). [`fit_numeric`] does the same, naming the row it failed on.
//!
//! Where DataFusion already agrees with PostgreSQL it is left alone, and the golden tests
//! (tests/e2e/derive.rs, values evaluated by a real PostgreSQL) pin it: decimal `+ - *` are
//! exact at scale s1+s2; `round(decimal, n)` rounds half away from zero.

use std::any::Any;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Decimal128Builder, Decimal256Array, Decimal256Builder};
use arrow::datatypes::{DataType, Decimal256Type, DecimalType, Field, FieldRef, i256};
use datafusion::common::{DFSchema, Result, ScalarValue, exec_err, plan_err};
use datafusion::logical_expr::planner::{ExprPlanner, PlannerResult, RawBinaryExpr};
use datafusion::logical_expr::{
    ColumnarValue, Expr, ExprSchemable, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature,
    TypeSignature, Volatility,
};
use datafusion::prelude::SessionContext;
use datafusion::sql::sqlparser::ast::BinaryOperator;

/// The scale at which [`pg_div`] stores its quotients, as Decimal256(76, 40): PostgreSQL's
/// result scale is at most 20 − 4·w for a quotient of base-10000 weight w, so every quotient
/// ≥ 10^-20 is stored exactly as PostgreSQL computes it, with 36 integer digits to spare.
pub const DIV_SCALE: i8 = 40;
const DIV_PRECISION: u8 = 76;

/// Registers Weir's PostgreSQL-exact functions and the `/` planner on a session.
pub fn register(ctx: &mut SessionContext) -> Result<()> {
    ctx.register_udf(pg_div());
    ctx.register_udf(fit_numeric());
    ctx.register_udaf(crate::aggregates::first_by());
    ctx.register_udaf(crate::aggregates::last_by());
    datafusion::execution::FunctionRegistry::register_expr_planner(ctx, Arc::new(PgArithmetic))?;
    Ok(())
}

pub fn pg_div() -> ScalarUDF {
    ScalarUDF::new_from_impl(PgDiv { signature: Signature::user_defined(Volatility::Immutable) })
}

pub fn fit_numeric() -> ScalarUDF {
    ScalarUDF::new_from_impl(FitNumeric { signature: Signature::new(TypeSignature::Any(5), Volatility::Immutable) })
}

/// Plans `a / b` as `pg_div(a, b)` when either side is a decimal and neither is a float.
#[derive(Debug)]
pub struct PgArithmetic;

impl ExprPlanner for PgArithmetic {
    fn plan_binary_op(&self, expr: RawBinaryExpr, schema: &DFSchema) -> Result<PlannerResult<RawBinaryExpr>> {
        if expr.op != BinaryOperator::Divide {
            return Ok(PlannerResult::Original(expr));
        }
        let (l, r) = (expr.left.get_type(schema)?, expr.right.get_type(schema)?);
        let decimal =
            |t: &DataType| matches!(t, DataType::Decimal128(..) | DataType::Decimal64(..) | DataType::Decimal32(..));
        let float = |t: &DataType| matches!(t, DataType::Float16 | DataType::Float32 | DataType::Float64);
        if (decimal(&l) || decimal(&r)) && !float(&l) && !float(&r) {
            return Ok(PlannerResult::Planned(Expr::ScalarFunction(
                datafusion::logical_expr::expr::ScalarFunction::new_udf(
                    Arc::new(pg_div()),
                    vec![expr.left, expr.right],
                ),
            )));
        }
        Ok(PlannerResult::Original(expr))
    }
}

/// (precision, scale) of a numeric argument once coerced to a decimal.
fn as_decimal(t: &DataType) -> Option<(u8, i8)> {
    Some(match t {
        DataType::Decimal256(p, s)
        | DataType::Decimal128(p, s)
        | DataType::Decimal64(p, s)
        | DataType::Decimal32(p, s) => (*p, *s),
        DataType::Int8 | DataType::UInt8 => (3, 0),
        DataType::Int16 | DataType::UInt16 => (5, 0),
        DataType::Int32 | DataType::UInt32 => (10, 0),
        DataType::Int64 => (19, 0),
        DataType::UInt64 => (20, 0),
        DataType::Null => (1, 0),
        _ => return None,
    })
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct PgDiv {
    signature: Signature,
}

impl ScalarUDFImpl for PgDiv {
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn name(&self) -> &str {
        "pg_div"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        if arg_types.len() != 2 {
            return plan_err!("pg_div takes two numeric arguments, got {}", arg_types.len());
        }
        arg_types
            .iter()
            .map(|t| match as_decimal(t) {
                Some((p, s)) if s >= 0 => Ok(DataType::Decimal256(p.max(1), s)),
                _ => plan_err!("pg_div: cannot divide a value of type {t} as numeric"),
            })
            .collect()
    }
    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        let scale = arg_types.iter().filter_map(as_decimal).map(|(_, s)| s).fold(DIV_SCALE, i8::max);
        Ok(DataType::Decimal256(DIV_PRECISION, scale))
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let DataType::Decimal256(_, out_scale) = *args.return_type() else {
            return exec_err!("pg_div: unexpected return type {}", args.return_type());
        };
        let n = args.number_rows;
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let (a, b) = (arrays[0].as_primitive::<Decimal256Type>(), arrays[1].as_primitive::<Decimal256Type>());
        let (sa, sb) = (decimal_scale(a.data_type()), decimal_scale(b.data_type()));
        let mut out = Decimal256Builder::with_capacity(n);
        for i in 0..a.len() {
            if a.is_null(i) || b.is_null(i) {
                out.append_null();
                continue;
            }
            out.append_value(div_value(a.value(i), sa, b.value(i), sb, out_scale)?);
        }
        let arr: Decimal256Array = out.finish().with_precision_and_scale(DIV_PRECISION, out_scale)?;
        let arr: ArrayRef = Arc::new(arr);
        if args.args.iter().all(|a| matches!(a, ColumnarValue::Scalar(_))) {
            Ok(ColumnarValue::Scalar(ScalarValue::try_from_array(&arr, 0)?))
        } else {
            Ok(ColumnarValue::Array(arr))
        }
    }
}

fn decimal_scale(t: &DataType) -> i8 {
    match t {
        DataType::Decimal256(_, s) | DataType::Decimal128(_, s) => *s,
        _ => 0,
    }
}

/// PostgreSQL's base-10000 (weight, first digit) of `v × 10^-scale`: the value lies in
/// [first × 10000^weight, (first+1) × 10000^weight). (0, 0) for zero, as in numeric.c.
fn nbase_weight(v: i256, scale: i8) -> (i32, u32) {
    if v == i256::ZERO {
        return (0, 0);
    }
    // |v| as an integer and its number of decimal digits (without printing it: a division
    // weighs both operands, and printing them was most of its cost).
    let abs = v.wrapping_abs();
    let len = match abs.to_i128() {
        Some(a) => (a as u128).ilog10() as i32 + 1,
        None => abs.to_string().trim_start_matches('-').len() as i32,
    };
    // Decimal exponent of the leading digit: value's leading digit is at 10^e.
    let e = len - 1 - i32::from(scale);
    let weight = e.div_euclid(4);
    // The base-10000 digit at `weight`: the leading decimal digits down to 10^(4·weight),
    // padded with zeros when |v| has fewer digits than that.
    let take = e - 4 * weight + 1;
    let first = if take <= len {
        abs.wrapping_div(pow10((len - take) as u32))
    } else {
        abs.wrapping_mul(pow10((take - len) as u32))
    };
    (weight, first.to_i128().unwrap_or(0) as u32)
}

/// PostgreSQL's `select_div_scale` for numerics of these display scales.
pub fn pg_div_scale(a: i256, sa: i8, b: i256, sb: i8) -> i32 {
    let (w1, f1) = nbase_weight(a, sa);
    let (w2, f2) = nbase_weight(b, sb);
    let mut qweight = w1 - w2;
    if f1 <= f2 {
        qweight -= 1;
    }
    (16 - qweight * 4).max(i32::from(sa)).max(i32::from(sb)).clamp(0, 1000)
}

fn pow10(n: u32) -> i256 {
    // 10^0 ..= 10^38 fit in i128: a table, not a loop of 256-bit multiplications.
    const SMALL: [i128; 39] = {
        let mut t = [1i128; 39];
        let mut i = 1;
        while i < 39 {
            t[i] = t[i - 1] * 10;
            i += 1;
        }
        t
    };
    match SMALL.get(n as usize) {
        Some(&p) => i256::from_i128(p),
        None => i256::from_i128(10).wrapping_pow(n),
    }
}

/// `a×10^-sa / b×10^-sb` as PostgreSQL computes it (rounded half away from zero at its
/// `select_div_scale`), returned at `out_scale`.
pub fn div_value(a: i256, sa: i8, b: i256, sb: i8, out_scale: i8) -> Result<i256> {
    if b == i256::ZERO {
        return exec_err!("division by zero");
    }
    let rscale = pg_div_scale(a, sa, b, sb);
    let shift = rscale - i32::from(sa) + i32::from(sb);
    let (mut num, mut den) = (a, b);
    if shift >= 0 {
        num = num.checked_mul(pow10(shift as u32)).ok_or_else(|| overflow("division"))?;
    } else {
        den = den.checked_mul(pow10((-shift) as u32)).ok_or_else(|| overflow("division"))?;
    }
    let q = round_div(num, den);
    // PostgreSQL's value has rscale digits; store it at out_scale.
    let stored = if i32::from(out_scale) >= rscale {
        q.checked_mul(pow10((i32::from(out_scale) - rscale) as u32)).ok_or_else(|| overflow("division"))?
    } else {
        round_div(q, pow10((rscale - i32::from(out_scale)) as u32))
    };
    let limit = pow10(u32::from(DIV_PRECISION));
    if stored >= limit || stored <= limit.wrapping_neg() {
        return Err(overflow("division"));
    }
    Ok(stored)
}

/// num / den rounded half away from zero.
fn round_div(num: i256, den: i256) -> i256 {
    // Most operands fit in i128, whose division is a machine instruction or two.
    if let (Some(n), Some(d)) = (num.to_i128(), den.to_i128())
        && d != 0
        && !(n == i128::MIN && d == -1)
    {
        let (q, r) = (n / d, n % d);
        // |r| < |d| <= 2^127, so 2|r| fits in u128.
        let q =
            if r.unsigned_abs() * 2 >= d.unsigned_abs() { if (n < 0) != (d < 0) { q - 1 } else { q + 1 } } else { q };
        return i256::from_i128(q);
    }
    let q = num.wrapping_div(den);
    let r = num.wrapping_rem(den);
    let twice = r.wrapping_abs().wrapping_mul(i256::from_i128(2));
    if twice >= den.wrapping_abs() {
        let negative = (num < i256::ZERO) != (den < i256::ZERO);
        if negative { q.wrapping_sub(i256::ONE) } else { q.wrapping_add(i256::ONE) }
    } else {
        q
    }
}

fn overflow(what: &str) -> datafusion::error::DataFusionError {
    datafusion::error::DataFusionError::Execution(format!("numeric field overflow in {what}"))
}

/// `fit_numeric(value, p, s, 'label', key)`: `value` as numeric(p,s) (rounded half away from
/// zero to s places, like PostgreSQL's assignment cast). A value that does not fit fails the
/// query with "numeric field overflow: <label> <key> = <value> does not fit numeric(p,s)".
#[derive(Debug, PartialEq, Eq, Hash)]
struct FitNumeric {
    signature: Signature,
}

fn literal_u8(v: Option<&ScalarValue>, what: &str) -> Result<i64> {
    match v {
        Some(s) if !s.is_null() => match s.cast_to(&DataType::Int64)? {
            ScalarValue::Int64(Some(v)) => Ok(v),
            _ => plan_err!("fit_numeric: {what} must be an integer literal"),
        },
        _ => plan_err!("fit_numeric: {what} must be an integer literal"),
    }
}

impl ScalarUDFImpl for FitNumeric {
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn name(&self) -> &str {
        "fit_numeric"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        plan_err!("fit_numeric: the return type comes from its precision and scale literals")
    }
    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef> {
        let p = literal_u8(args.scalar_arguments.get(1).copied().flatten(), "precision")?;
        let s = literal_u8(args.scalar_arguments.get(2).copied().flatten(), "scale")?;
        if !(1..=38).contains(&p) || !(0..=p).contains(&s) {
            return plan_err!("fit_numeric: numeric({p},{s}) is not a valid type");
        }
        if as_decimal(args.arg_fields[0].data_type()).is_none() {
            return plan_err!("fit_numeric: cannot fit a value of type {} as numeric", args.arg_fields[0].data_type());
        }
        Ok(Arc::new(Field::new(self.name(), DataType::Decimal128(p as u8, s as i8), true)))
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let DataType::Decimal128(p, s) = *args.return_type() else {
            return exec_err!("fit_numeric: unexpected return type {}", args.return_type());
        };
        let n = args.number_rows;
        let value = args.args[0].to_array(n)?;
        let (vp, vs) = as_decimal(value.data_type()).unwrap_or((38, 0));
        let value = arrow::compute::cast(&value, &DataType::Decimal256(vp.max(1), vs))?;
        let value = value.as_primitive::<Decimal256Type>();
        let label = match &args.args[3] {
            ColumnarValue::Scalar(ScalarValue::Utf8(Some(l))) => l.clone(),
            _ => "row".to_string(),
        };
        let keys = arrow::compute::cast(&args.args[4].to_array(n)?, &DataType::Utf8)?;
        let keys = keys.as_string::<i32>();
        let limit = 10i128.pow(u32::from(p));
        let mut out = Decimal128Builder::with_capacity(n);
        for i in 0..n {
            if value.is_null(i) {
                out.append_null();
                continue;
            }
            let v = value.value(i);
            let rescaled = if s >= vs {
                v.checked_mul(pow10((s - vs) as u32)).and_then(|r| r.to_i128())
            } else {
                round_div(v, pow10((vs - s) as u32)).to_i128()
            };
            match rescaled {
                Some(r) if r.unsigned_abs() < limit as u128 => out.append_value(r),
                _ => {
                    let shown = Decimal256Type::format_decimal(v, vp.max(1), vs);
                    let key = if keys.is_null(i) { "NULL" } else { keys.value(i) };
                    return exec_err!("numeric field overflow: {label} {key} = {shown} does not fit numeric({p},{s})");
                }
            }
        }
        let arr: ArrayRef = Arc::new(out.finish().with_precision_and_scale(p, s)?);
        Ok(ColumnarValue::Array(arr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_follow_numeric_c() {
        // 12.34: base-10000 digits [12, 3400], weight 0, first digit 12.
        let w = |v: i128, s: i8| nbase_weight(i256::from_i128(v), s);
        assert_eq!(w(1234, 2), (0, 12));
        // 12345.6: [1, 2345, 6000], weight 1, first 1.
        assert_eq!(w(123456, 1), (1, 1));
        // 0.5: [5000] at weight -1.
        assert_eq!(w(5, 1), (-1, 5000));
        // 0.00001: [0, 1000] → weight -2, first 1000.
        assert_eq!(w(1, 5), (-2, 1000));
        assert_eq!(w(-9999, 0), (0, 9999));
        assert_eq!(w(10000, 0), (1, 1));
    }

    #[test]
    fn division_scale_and_rounding() {
        let i = i256::from_i128;
        let div = |a: i128, b: i128| div_value(i(a), 0, i(b), 0, 20).map(|v| v.to_i128().unwrap());
        // 1 / 3 = 0.33333333333333333333 (PostgreSQL: 20 places).
        assert_eq!(pg_div_scale(i(1), 0, i(3), 0), 20);
        assert_eq!(div(1, 3).unwrap(), 33_333_333_333_333_333_333);
        // 2 / 3 rounds up in the last place: 0.66666666666666666667.
        assert_eq!(div(2, 3).unwrap(), 66_666_666_666_666_666_667);
        // -2 / 3 rounds away from zero.
        assert_eq!(div(-2, 3).unwrap(), -66_666_666_666_666_666_667);
        // 10 / 4 = 2.5000000000000000 (scale 16), exact.
        assert_eq!(pg_div_scale(i(10), 0, i(4), 0), 16);
        assert_eq!(div(10, 4).unwrap(), 25 * 10i128.pow(19));
        assert!(div(1, 0).is_err());
    }

    /// The fast paths (digit counts without printing, a table of powers, i128 division) give
    /// what the plain 256-bit code gives, on values of every length, both signs, every
    /// rounding case, and past i128.
    #[test]
    fn fast_paths_equal_the_plain_256_bit_code() {
        fn weight_by_text(v: i256, scale: i8) -> (i32, u32) {
            if v == i256::ZERO {
                return (0, 0);
            }
            let digits = v.to_string();
            let digits = digits.trim_start_matches('-');
            let e = digits.len() as i32 - 1 - i32::from(scale);
            let weight = e.div_euclid(4);
            let take = (e - 4 * weight + 1) as usize;
            let first: u32 = digits[..take.min(digits.len())].parse().unwrap();
            (weight, first * 10u32.pow((take.saturating_sub(digits.len())) as u32))
        }
        fn round_div_256(num: i256, den: i256) -> i256 {
            let (q, r) = (num.wrapping_div(den), num.wrapping_rem(den));
            if r.wrapping_abs().wrapping_mul(i256::from_i128(2)) >= den.wrapping_abs() {
                if (num < i256::ZERO) != (den < i256::ZERO) {
                    q.wrapping_sub(i256::ONE)
                } else {
                    q.wrapping_add(i256::ONE)
                }
            } else {
                q
            }
        }
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut values = vec![i256::ONE, i256::from_i128(i128::MAX), i256::from_i128(i128::MIN + 1)];
        for _ in 0..20_000 {
            let digits = next() % 39;
            let v = i256::from_i128(
                (u128::from(next()) << 64 | u128::from(next())) as i128 % 10i128.pow(digits as u32).max(1),
            );
            values.push(if next() % 2 == 0 { v } else { v.wrapping_neg() });
        }
        values.push(i256::from_i128(i128::MAX).wrapping_mul(i256::from_i128(1000)));
        for n in 0..77 {
            assert_eq!(pow10(n), i256::from_i128(10).wrapping_pow(n), "10^{n}");
        }
        for (i, &v) in values.iter().enumerate() {
            let scale = (next() % 20) as i8;
            assert_eq!(nbase_weight(v, scale), weight_by_text(v, scale), "{v} at scale {scale}");
            let d = values[(i * 7 + 3) % values.len()];
            for den in [d, i256::from_i128(3), i256::from_i128(-2), i256::from_i128(i128::from(next() % 10_000) + 1)] {
                if den != i256::ZERO {
                    assert_eq!(round_div(v, den), round_div_256(v, den), "{v} / {den}");
                }
            }
        }
    }
}
