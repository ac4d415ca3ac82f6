//! `first_by(value, ordering)` and `last_by(value, ordering)`: the value of the row with the
//! smallest (largest) ordering value in the group, NULL values included — PostgreSQL's
//! `(array_agg(value ORDER BY ordering))[1]`. The legacy mart folds the price log with
//! exactly that; DataFusion's `first_value(… ORDER BY …)` computes the same but compares
//! orderings generically and costs ~6× a `min`. These keep an (i64 ordering, i128 value)
//! pair per group. Rows whose ordering is NULL are skipped; with ties the first row seen
//! wins, so the ordering should be unique within a group (it is: the price log's key).

use std::any::Any;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, Decimal128Array, Int64Array};
use arrow::buffer::NullBuffer;
use arrow::datatypes::{DataType, Decimal128Type, Field, FieldRef, Int64Type};
use datafusion::common::{Result, ScalarValue, plan_err};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, EmitTo, GroupsAccumulator, Signature, Volatility,
};

pub fn first_by() -> AggregateUDF {
    AggregateUDF::new_from_impl(By { signature: Signature::user_defined(Volatility::Immutable), last: false })
}

pub fn last_by() -> AggregateUDF {
    AggregateUDF::new_from_impl(By { signature: Signature::user_defined(Volatility::Immutable), last: true })
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct By {
    signature: Signature,
    last: bool,
}

impl AggregateUDFImpl for By {
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn name(&self) -> &str {
        if self.last { "last_by" } else { "first_by" }
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn coerce_types(&self, t: &[DataType]) -> Result<Vec<DataType>> {
        let [value, ordering] = t else {
            return plan_err!("{}(value, ordering) takes two arguments, got {}", self.name(), t.len());
        };
        let value = match value {
            DataType::Decimal128(p, s) => DataType::Decimal128(*p, *s),
            DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64 => DataType::Decimal128(19, 0),
            DataType::Decimal32(p, s) | DataType::Decimal64(p, s) => DataType::Decimal128(*p, *s),
            other => return plan_err!("{}: the value must be numeric or decimal, got {other}", self.name()),
        };
        match ordering {
            DataType::Timestamp(_, _)
            | DataType::Date32
            | DataType::Date64
            | DataType::Int8
            | DataType::Int16
            | DataType::Int32
            | DataType::Int64 => Ok(vec![value, DataType::Int64]),
            other => plan_err!("{}: the ordering must be a timestamp, date or integer, got {other}", self.name()),
        }
    }
    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        Ok(arg_types[0].clone())
    }
    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        Ok(vec![
            Arc::new(Field::new(format!("{}_ordering", args.name), DataType::Int64, true)),
            Arc::new(Field::new(format!("{}_value", args.name), args.return_type().clone(), true)),
            Arc::new(Field::new(format!("{}_seen", args.name), DataType::Boolean, true)),
        ])
    }
    fn accumulator(&self, args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        Ok(Box::new(One { groups: Groups::new(self.last, args.return_field.data_type().clone()) }))
    }
    fn groups_accumulator_supported(&self, _args: AccumulatorArgs) -> bool {
        true
    }
    fn create_groups_accumulator(&self, args: AccumulatorArgs) -> Result<Box<dyn GroupsAccumulator>> {
        Ok(Box::new(Groups::new(self.last, args.return_field.data_type().clone())))
    }
}

/// Per group: the best ordering seen, its value (None = NULL), and whether any row was seen.
#[derive(Debug)]
struct Groups {
    last: bool,
    data_type: DataType,
    ordering: Vec<i64>,
    value: Vec<i128>,
    value_valid: Vec<bool>,
    seen: Vec<bool>,
}

impl Groups {
    fn new(last: bool, data_type: DataType) -> Self {
        Groups { last, data_type, ordering: vec![], value: vec![], value_valid: vec![], seen: vec![] }
    }

    fn resize(&mut self, n: usize) {
        self.ordering.resize(n, 0);
        self.value.resize(n, 0);
        self.value_valid.resize(n, false);
        self.seen.resize(n, false);
    }

    /// Offers rows (ordering, value) to their groups; `keep(row)` filters.
    fn offer(
        &mut self,
        ordering: &Int64Array,
        value: &Decimal128Array,
        group_indices: &[usize],
        keep: impl Fn(usize) -> bool,
    ) {
        for (row, &g) in group_indices.iter().enumerate() {
            if ordering.is_null(row) || !keep(row) {
                continue;
            }
            let o = ordering.value(row);
            let better = !self.seen[g] || if self.last { o > self.ordering[g] } else { o < self.ordering[g] };
            if better {
                self.seen[g] = true;
                self.ordering[g] = o;
                self.value_valid[g] = value.is_valid(row);
                self.value[g] = value.value(row);
            }
        }
    }

    fn take(&mut self, emit_to: EmitTo) -> (Vec<i64>, Vec<i128>, Vec<bool>, Vec<bool>) {
        (
            emit_to.take_needed(&mut self.ordering),
            emit_to.take_needed(&mut self.value),
            emit_to.take_needed(&mut self.value_valid),
            emit_to.take_needed(&mut self.seen),
        )
    }

    fn value_array(&self, value: Vec<i128>, valid: impl Iterator<Item = bool>) -> Result<ArrayRef> {
        let nulls = NullBuffer::from_iter(valid);
        Ok(Arc::new(Decimal128Array::new(value.into(), Some(nulls)).with_data_type(self.data_type.clone())))
    }
}

fn filter_fn(opt_filter: Option<&BooleanArray>) -> impl Fn(usize) -> bool + '_ {
    move |row| opt_filter.is_none_or(|f| f.is_valid(row) && f.value(row))
}

impl GroupsAccumulator for Groups {
    fn update_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> Result<()> {
        self.resize(total_num_groups);
        let value = values[0].as_primitive::<Decimal128Type>();
        let ordering = values[1].as_primitive::<Int64Type>();
        self.offer(ordering, value, group_indices, filter_fn(opt_filter));
        Ok(())
    }

    fn merge_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> Result<()> {
        self.resize(total_num_groups);
        let ordering = values[0].as_primitive::<Int64Type>();
        let value = values[1].as_primitive::<Decimal128Type>();
        let seen = values[2].as_boolean();
        let keep = filter_fn(opt_filter);
        self.offer(ordering, value, group_indices, |row| seen.is_valid(row) && seen.value(row) && keep(row));
        Ok(())
    }

    fn evaluate(&mut self, emit_to: EmitTo) -> Result<ArrayRef> {
        let (_, value, valid, seen) = self.take(emit_to);
        self.value_array(value, valid.into_iter().zip(seen).map(|(v, s)| v && s))
    }

    fn state(&mut self, emit_to: EmitTo) -> Result<Vec<ArrayRef>> {
        let (ordering, value, valid, seen) = self.take(emit_to);
        let ordering: ArrayRef = Arc::new(Int64Array::new(ordering.into(), Some(NullBuffer::from(seen.clone()))));
        let value = self.value_array(value, valid.into_iter())?;
        Ok(vec![ordering, value, Arc::new(BooleanArray::from(seen))])
    }

    fn size(&self) -> usize {
        self.ordering.capacity() * 8 + self.value.capacity() * 16 + self.value_valid.capacity() + self.seen.capacity()
    }
}

/// The ungrouped form: one group.
#[derive(Debug)]
struct One {
    groups: Groups,
}

impl Accumulator for One {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        let zeros = vec![0; values[0].len()];
        self.groups.update_batch(values, &zeros, None, 1)
    }
    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        let zeros = vec![0; states[0].len()];
        self.groups.merge_batch(states, &zeros, None, 1)
    }
    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        self.groups.resize(1);
        let (o, v, valid, seen) =
            (self.groups.ordering[0], self.groups.value[0], self.groups.value_valid[0], self.groups.seen[0]);
        let value = ScalarValue::new_primitive::<Decimal128Type>((seen && valid).then_some(v), &self.groups.data_type)?;
        Ok(vec![ScalarValue::Int64(seen.then_some(o)), value, ScalarValue::Boolean(Some(seen))])
    }
    fn evaluate(&mut self) -> Result<ScalarValue> {
        self.groups.resize(1);
        let (v, valid, seen) = (self.groups.value[0], self.groups.value_valid[0], self.groups.seen[0]);
        ScalarValue::new_primitive::<Decimal128Type>((seen && valid).then_some(v), &self.groups.data_type)
    }
    fn size(&self) -> usize {
        std::mem::size_of::<Self>() + self.groups.size()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dec(v: &[Option<i128>]) -> ArrayRef {
        Arc::new(Decimal128Array::from(v.to_vec()).with_precision_and_scale(12, 2).unwrap())
    }

    fn ints(v: &[Option<i64>]) -> ArrayRef {
        Arc::new(Int64Array::from(v.to_vec()))
    }

    fn values(a: &ArrayRef) -> Vec<Option<i128>> {
        a.as_primitive::<Decimal128Type>().iter().collect()
    }

    #[test]
    fn first_and_last_keep_nulls_and_survive_partial_states() {
        let dt = DataType::Decimal128(12, 2);
        // Group 0: orderings 5, 3 (value NULL), 9 → first NULL, last 900.
        // Group 1: one row with a NULL ordering (skipped) and one at 1 → 100 both ways.
        let v = dec(&[Some(500), None, Some(900), Some(7), Some(100)]);
        let o = ints(&[Some(5), Some(3), Some(9), None, Some(1)]);
        let groups = [0, 0, 0, 1, 1];
        for (last, want) in [(false, vec![None, Some(100)]), (true, vec![Some(900), Some(100)])] {
            let mut direct = Groups::new(last, dt.clone());
            direct.update_batch(&[v.clone(), o.clone()], &groups, None, 2).unwrap();
            assert_eq!(values(&direct.evaluate(EmitTo::All).unwrap()), want, "last={last}");

            // The same rows split over two partial accumulators, then merged.
            let (mut a, mut b) = (Groups::new(last, dt.clone()), Groups::new(last, dt.clone()));
            a.update_batch(&[v.slice(0, 2), o.slice(0, 2)], &groups[..2], None, 2).unwrap();
            b.update_batch(&[v.slice(2, 3), o.slice(2, 3)], &groups[2..], None, 2).unwrap();
            let mut m = Groups::new(last, dt.clone());
            m.merge_batch(&a.state(EmitTo::All).unwrap(), &[0, 1], None, 2).unwrap();
            m.merge_batch(&b.state(EmitTo::All).unwrap(), &[0, 1], None, 2).unwrap();
            assert_eq!(values(&m.evaluate(EmitTo::All).unwrap()), want, "merged, last={last}");
        }
        // A group that saw nothing is NULL; a filter drops rows.
        let mut g = Groups::new(false, dt);
        let filter = BooleanArray::from(vec![false, true, true, true, true]);
        g.update_batch(&[v, o], &[0, 0, 0, 0, 0], Some(&filter), 2).unwrap();
        assert_eq!(values(&g.evaluate(EmitTo::All).unwrap()), vec![Some(100), None]);
    }
}
