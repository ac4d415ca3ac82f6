output "bucket" {
  description = "The lake bucket; use s3://<bucket>/<prefix> as Weir's lake URI."
  value       = aws_s3_bucket.lake.bucket
}

output "region" {
  description = "The bucket's region (set it as s3.region in weir.toml or AWS_REGION)."
  value       = var.region
}

output "kms_key_arn" {
  description = "The dedicated SSE-KMS key."
  value       = aws_kms_key.lake.arn
}

output "writer_role_arn" {
  description = "Role for backfill, sync and derive."
  value       = aws_iam_role.writer.arn
}

output "reader_role_arn" {
  description = "Read-only role for serve and analysts."
  value       = aws_iam_role.reader.arn
}
