variable "region" {
  description = "AWS region of the lake bucket. EU member-state regions only (London eu-west-2 and Zurich eu-central-2 are in Europe but not in the EU)."
  type        = string
  default     = "eu-central-1"

  validation {
    condition     = contains(["eu-central-1", "eu-west-1", "eu-west-3", "eu-north-1", "eu-south-1", "eu-south-2"], var.region)
    error_message = "The lake must live in an EU region: eu-central-1, eu-west-1, eu-west-3, eu-north-1, eu-south-1 or eu-south-2."
  }
}

variable "bucket_name" {
  description = "Name of the lake bucket (globally unique)."
  type        = string

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", var.bucket_name))
    error_message = "Bucket names are 3-63 characters of a-z, 0-9, '.' and '-'."
  }
}

variable "writer_principals" {
  description = "IAM principal ARNs allowed to assume the writer role (backfill, sync, derive)."
  type        = list(string)
}

variable "reader_principals" {
  description = "IAM principal ARNs allowed to assume the read-only role (serve, analysts)."
  type        = list(string)
  default     = []
}

variable "noncurrent_version_days" {
  description = "Days a replaced or deleted object version is kept before it expires (time travel below Delta's own history)."
  type        = number
  default     = 30

  validation {
    condition     = var.noncurrent_version_days >= 1
    error_message = "Keep noncurrent versions for at least one day."
  }
}

variable "kms_deletion_window_days" {
  description = "Waiting period before the lake's KMS key can be deleted."
  type        = number
  default     = 30
}

variable "tags" {
  description = "Tags for every resource."
  type        = map(string)
  default     = {}
}
