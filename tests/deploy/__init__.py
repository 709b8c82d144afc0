"""What users deploy: the container image, the Helm chart and the OpenAPI document."""
