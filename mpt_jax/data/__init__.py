"""CrossFit data: reading, validation, the study's settings, batching and the offline gyms."""
