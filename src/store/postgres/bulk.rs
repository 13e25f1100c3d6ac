//! Benchmark data sets on PostgreSQL: certificate records written with `COPY … FROM STDIN
//! BINARY`, a chunk per statement, outside the audit chain (`payra bench populate
//! --store-url`). For measurement only, like [`crate::store::SledStore::danger_bulk_insert_certificates`].

use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};

use super::{db_error, pool_error, PgStore};
use crate::error::{Error, Result};
use crate::store::records::{CertificateRecord, CertificateSummary};

/// Rows per COPY statement (each its own transaction).
const CHUNK: usize = 20_000;

/// One `certificates` row, its columns as the table orders them in [`COLUMNS`].
struct Row {
    serial: Vec<u8>,
    customer_id: String,
    device_id: String,
    not_after_s: i64,
    summary: Vec<u8>,
    record: serde_json::Value,
    public_key: Vec<u8>,
}

const COLUMNS: &str = "serial, customer_id, device_id, not_after_s, summary, record, public_key";
const TYPES: [Type; 7] = [
    Type::BYTEA,
    Type::TEXT,
    Type::TEXT,
    Type::INT8,
    Type::BYTEA,
    Type::JSONB,
    Type::BYTEA,
];

impl Row {
    fn of(record: &CertificateRecord) -> Result<Row> {
        let summary = CertificateSummary::of(record)?;
        Ok(Row {
            serial: record.serial.as_bytes().to_vec(),
            customer_id: record.customer_id.as_str().to_string(),
            device_id: record.device_id.as_str().to_string(),
            not_after_s: record.not_after_s,
            summary: summary.encode(),
            record: serde_json::to_value(record)
                .map_err(|e| Error::internal(format!("encoding record: {e}")))?,
            public_key: summary.public_key.to_vec(),
        })
    }

    fn columns(&self) -> [&(dyn ToSql + Sync); 7] {
        [
            &self.serial,
            &self.customer_id,
            &self.device_id,
            &self.not_after_s,
            &self.summary,
            &self.record,
            &self.public_key,
        ]
    }
}

impl PgStore {
    /// Inserts certificate records in COPY chunks, with no audit entry; the count inserted.
    /// For building benchmark data sets only: records written this way are not in the
    /// audit chain.
    pub fn danger_bulk_insert_certificates(
        &self,
        records: impl Iterator<Item = CertificateRecord>,
    ) -> Result<u64> {
        let mut count = 0;
        let mut chunk = Vec::with_capacity(CHUNK);
        for record in records {
            chunk.push(Row::of(&record)?);
            if chunk.len() == CHUNK {
                count +=
                    self.copy_rows(std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK)))?;
            }
        }
        if !chunk.is_empty() {
            count += self.copy_rows(chunk)?;
        }
        Ok(count)
    }

    fn copy_rows(&self, rows: Vec<Row>) -> Result<u64> {
        let pool = self.pool.clone();
        self.block(async move {
            let client = pool.get().await.map_err(pool_error)?;
            let sink = client
                .copy_in(&format!(
                    "COPY certificates ({COLUMNS}) FROM STDIN (FORMAT binary)"
                ))
                .await
                .map_err(db_error)?;
            let mut writer = std::pin::pin!(BinaryCopyInWriter::new(sink, &TYPES));
            for row in &rows {
                writer
                    .as_mut()
                    .write(&row.columns())
                    .await
                    .map_err(db_error)?;
            }
            writer.finish().await.map_err(db_error)
        })
    }
}
