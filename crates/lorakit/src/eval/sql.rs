//! SQL execution match: the predicted and the reference query run on the same in-memory SQLite
//! database (built from the example's `schema` script), and their result sets are compared as
//! multisets of rows, or as sequences when the reference has `ORDER BY`. Column names do not
//! matter; an integer equals a real of the same value (as Python's `==`, which Spider's
//! evaluation uses). A prediction that fails to prepare or run, or runs too long, does not match.

use std::cmp::Ordering;

use rusqlite::hooks::{AuthAction, AuthContext, Authorization};
use rusqlite::types::ValueRef;
use rusqlite::Connection;

/// SQLite virtual-machine steps (in units of [`PROGRESS_PERIOD`]) after which a query is
/// interrupted: a generated query may loop (a recursive CTE) or join everything with everything.
const MAX_PROGRESS_CALLS: u64 = 20_000;
const PROGRESS_PERIOD: i32 = 1_000;

/// One cell of a result, in a form that compares and sorts totally.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Null,
    Num(f64),
    Text(String),
    Blob(Vec<u8>),
}

impl Cell {
    fn rank(&self) -> u8 {
        match self {
            Cell::Null => 0,
            Cell::Num(_) => 1,
            Cell::Text(_) => 2,
            Cell::Blob(_) => 3,
        }
    }
    fn cmp(&self, other: &Cell) -> Ordering {
        match (self, other) {
            (Cell::Num(a), Cell::Num(b)) => a.total_cmp(b),
            (Cell::Text(a), Cell::Text(b)) => a.cmp(b),
            (Cell::Blob(a), Cell::Blob(b)) => a.cmp(b),
            _ => self.rank().cmp(&other.rank()),
        }
    }
}

pub type Rows = Vec<Vec<Cell>>;

/// Opens an in-memory database and runs the schema script. The error is SQLite's message.
pub fn open_database(schema: &str) -> Result<Connection, String> {
    let db = Connection::open_in_memory().map_err(|e| e.to_string())?;
    db.execute_batch(schema).map_err(|e| e.to_string())?;
    Ok(db)
}

/// Runs one query (a trailing `;` is allowed) and returns its rows, or SQLite's error.
pub fn run_query(db: &Connection, sql: &str) -> Result<Rows, String> {
    let sql = sql.trim().trim_end_matches(';').trim();
    if sql.is_empty() {
        return Err("empty query".into());
    }
    let mut calls = 0u64;
    db.progress_handler(
        PROGRESS_PERIOD,
        Some(move || {
            calls += 1;
            calls > MAX_PROGRESS_CALLS
        }),
    );
    // The query is model output, so untrusted: allow reading only. Without this, a prediction
    // such as `ATTACH 'x.db' AS x` or `VACUUM INTO 'x.db'` would create files on disk.
    db.authorizer(Some(|ctx: AuthContext<'_>| match ctx.action {
        AuthAction::Select
        | AuthAction::Read { .. }
        | AuthAction::Function { .. }
        | AuthAction::Recursive => Authorization::Allow,
        _ => Authorization::Deny,
    }));
    let result = (|| {
        let mut stmt = db.prepare(sql).map_err(|e| e.to_string())?;
        let ncol = stmt.column_count();
        let mut rows = stmt.query([]).map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(|e| e.to_string())? {
            let mut cells = Vec::with_capacity(ncol);
            for i in 0..ncol {
                let v = row.get_ref(i).map_err(|e| e.to_string())?;
                cells.push(match v {
                    ValueRef::Null => Cell::Null,
                    ValueRef::Integer(i) => Cell::Num(i as f64),
                    ValueRef::Real(f) => Cell::Num(f),
                    ValueRef::Text(t) => Cell::Text(String::from_utf8_lossy(t).into_owned()),
                    ValueRef::Blob(b) => Cell::Blob(b.to_vec()),
                });
            }
            out.push(cells);
        }
        Ok(out)
    })();
    db.progress_handler(0, None::<fn() -> bool>);
    db.authorizer(None::<fn(AuthContext<'_>) -> Authorization>);
    result
}

fn cmp_rows(a: &[Cell], b: &[Cell]) -> Ordering {
    for (x, y) in a.iter().zip(b) {
        match x.cmp(y) {
            Ordering::Equal => {}
            o => return o,
        }
    }
    a.len().cmp(&b.len())
}

/// Whether the reference asks for an order (then the rows must come in the same order).
pub fn has_order_by(sql: &str) -> bool {
    let words: Vec<String> = sql
        .split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .filter(|w| !w.is_empty())
        .map(str::to_ascii_lowercase)
        .collect();
    words.windows(2).any(|w| w[0] == "order" && w[1] == "by")
}

/// Outcome of one example.
#[derive(Debug, Clone, PartialEq)]
pub struct ExecMatch {
    pub matched: bool,
    /// Why the prediction did not run, when it did not.
    pub prediction_error: Option<String>,
}

/// Runs `reference` and `prediction` on a fresh database built from `schema`. `Err` when the
/// schema or the *reference* fails (the data is wrong); a failing prediction is a mismatch.
pub fn execution_match(
    schema: &str,
    reference: &str,
    prediction: &str,
) -> Result<ExecMatch, String> {
    let db = open_database(schema).map_err(|e| format!("the schema does not run: {e}"))?;
    let mut want =
        run_query(&db, reference).map_err(|e| format!("the reference query does not run: {e}"))?;
    let mut got = match run_query(&db, prediction) {
        Ok(rows) => rows,
        Err(e) => {
            return Ok(ExecMatch {
                matched: false,
                prediction_error: Some(e),
            })
        }
    };
    if !has_order_by(reference) {
        want.sort_by(|a, b| cmp_rows(a, b));
        got.sort_by(|a, b| cmp_rows(a, b));
    }
    let matched = want.len() == got.len()
        && want
            .iter()
            .zip(&got)
            .all(|(a, b)| cmp_rows(a, b) == Ordering::Equal);
    Ok(ExecMatch {
        matched,
        prediction_error: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCHEMA: &str = "CREATE TABLE singer (id NUMERIC, name TEXT, age NUMERIC);
        INSERT INTO singer VALUES (1, 'Ann', 30), (2, 'Bob', 25), (3, 'Cy', 30);";

    #[test]
    fn different_text_same_result_matches() {
        let r = execution_match(
            SCHEMA,
            "SELECT count(*) FROM singer WHERE age = 30",
            "select COUNT(id) from singer where age >= 30;",
        )
        .unwrap();
        assert!(r.matched);
        // Order-insensitive without ORDER BY, column names ignored, 30 == 30.0.
        let r = execution_match(
            SCHEMA,
            "SELECT name FROM singer WHERE age = 30",
            "SELECT name AS n FROM singer WHERE age = 30.0 ORDER BY name DESC",
        )
        .unwrap();
        assert!(r.matched);
    }

    #[test]
    fn order_by_in_the_reference_makes_order_count() {
        let r = execution_match(
            SCHEMA,
            "SELECT name FROM singer ORDER BY age",
            "SELECT name FROM singer ORDER BY age DESC",
        )
        .unwrap();
        assert!(!r.matched);
        // Multisets: a duplicate row is not the same as one.
        let r = execution_match(
            SCHEMA,
            "SELECT age FROM singer",
            "SELECT DISTINCT age FROM singer",
        )
        .unwrap();
        assert!(!r.matched);
    }

    #[test]
    fn bad_prediction_is_a_mismatch_and_bad_reference_an_error() {
        let r = execution_match(SCHEMA, "SELECT 1", "SELEC nonsense").unwrap();
        assert!(!r.matched && r.prediction_error.is_some());
        let r = execution_match(SCHEMA, "SELECT 1", "SELECT 1; DROP TABLE singer").unwrap();
        assert!(!r.matched, "several statements are not one query");
        assert!(execution_match(SCHEMA, "SELECT nope FROM singer", "SELECT 1").is_err());
        assert!(execution_match("CREATE TABLE (", "SELECT 1", "SELECT 1").is_err());
    }

    #[test]
    fn predictions_cannot_write_or_attach_files() {
        let dir = std::env::temp_dir().join(format!("lorakit-sql-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let target = dir.join("x.db");
        for q in [
            format!("ATTACH '{}' AS x", target.display()),
            format!("VACUUM INTO '{}'", target.display()),
            "DROP TABLE singer".to_string(),
            "PRAGMA writable_schema = 1".to_string(),
        ] {
            let r = execution_match(SCHEMA, "SELECT 1", &q).unwrap();
            assert!(!r.matched, "{q} matched");
            let why = r.prediction_error.unwrap_or_default();
            assert!(why.contains("authoriz"), "{q}: {why}");
        }
        assert!(
            !target.exists(),
            "a prediction created {}",
            target.display()
        );
        std::fs::remove_dir_all(&dir).unwrap();
        // The database is unchanged: a later prediction still sees the table.
        let db = open_database(SCHEMA).unwrap();
        assert!(run_query(&db, "DROP TABLE singer").is_err());
        assert!(run_query(&db, "SELECT count(*) FROM singer").is_ok());
    }

    #[test]
    fn runaway_prediction_is_interrupted() {
        let r = execution_match(
            SCHEMA,
            "SELECT 1",
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c",
        )
        .unwrap();
        assert!(!r.matched && r.prediction_error.is_some());
    }
}
