"""Fakes of the AWS endpoints the metering sidecar talks to, for tests only.

They share one :class:`KeyRegistry`: keys issued by the credential fakes are the
ones the metering fake verifies SigV4 signatures against.
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

__all__ = [
    "CONTENT_TYPE",
    "SIGNING_NAME",
    "TARGET_PREFIX",
    "AwsError",
    "BatchGrain",
    "BatchRecord",
    "FakeContainerCredentials",
    "FakeMetering",
    "FakeSTS",
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
    "StsCall",
    "Violation",
    "format_violations",
    "isolate_aws_env",
    "metering_client",
    "serve",
    "sign",
    "signed_post",
    "validate_input",
    "validate_shape",
    "verify_request",
]
