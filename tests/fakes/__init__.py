"""Fakes of the AWS endpoints the metering sidecar talks to, for tests only.

They share one :class:`KeyRegistry`: keys issued by the credential fakes are the
ones the metering and SQS fakes verify SigV4 signatures against.
"""

from .clients import isolate_aws_env, metering_client, sign, signed_post
from .credentials import FakeContainerCredentials, FakeSTS, StsCall
from .faults import Fault, FaultPlan, InjectedDisconnect
from .keys import IssuedKey, KeyRegistry
from .metering import CONTENT_TYPE, SIGNING_NAME, TARGET_PREFIX, FakeMetering, RecordedRequest
from .metering_actions import BatchGrain, BatchRecord, MeterUsageGrain, MeterUsageRecord
from .metering_rules import AwsError
from .model import Violation, format_violations, validate_input, validate_shape
from .server import RunningServer, serve
from .sigv4 import SignatureFailure, verify_request
from .sqs import (
    SQS_CONTENT_TYPE,
    SQS_SIGNING_NAME,
    SQS_TARGET_PREFIX,
    FakeSqs,
    SqsError,
    SqsRequest,
    sqs_client,
)

__all__ = [
    "CONTENT_TYPE",
    "SIGNING_NAME",
    "SQS_CONTENT_TYPE",
    "SQS_SIGNING_NAME",
    "SQS_TARGET_PREFIX",
    "TARGET_PREFIX",
    "AwsError",
    "BatchGrain",
    "BatchRecord",
    "FakeContainerCredentials",
    "FakeMetering",
    "FakeSTS",
    "FakeSqs",
    "Fault",
    "FaultPlan",
    "InjectedDisconnect",
    "IssuedKey",
    "KeyRegistry",
    "MeterUsageGrain",
    "MeterUsageRecord",
    "RecordedRequest",
    "RunningServer",
    "SignatureFailure",
    "SqsError",
    "SqsRequest",
    "StsCall",
    "Violation",
    "format_violations",
    "isolate_aws_env",
    "metering_client",
    "serve",
    "sign",
    "signed_post",
    "sqs_client",
    "validate_input",
    "validate_shape",
    "verify_request",
]
