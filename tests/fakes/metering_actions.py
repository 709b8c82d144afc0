"""State and operation handlers of the fake Marketplace Metering service.

Everything here is synchronous and protocol-free: handlers take the decoded,
model-validated request and return the response dict or raise ``AwsError``.
``metering.py`` wraps this in the JSON 1.1 / SigV4 / fault-injection layer.
"""

from __future__ import annotations

import base64
import json
import secrets
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from .faults import FaultPlan
from .metering_rules import (
    Allocations,
    AwsError,
    check_month_close,
    check_timestamp,
    hour_of,
    normalize_allocations,
    parse_quantity,
)

__all__ = ["BatchGrain", "BatchRecord", "MeterUsageGrain", "MeterUsageRecord", "MeteringState"]

# Grains are what AWS deduplicates on; the hour is an aware UTC datetime.
MeterUsageGrain = tuple[str, str, datetime]  # (ProductCode, UsageDimension, hour)
BatchGrain = tuple[str, str, str, datetime]  # (LicenseArn|ProductCode, customer, Dimension, hour)

MAX_BATCH_BODY = 1_000_000
DRY_RUN_MESSAGE = "Request would have succeeded, but DryRun flag is set."


@dataclass(frozen=True)
class MeterUsageRecord:
    """A usage record accepted by MeterUsage."""

    metering_record_id: str
    product_code: str
    dimension: str
    hour: datetime
    timestamp: datetime
    quantity: Decimal
    allocations: Allocations | None
    client_token: str | None
    access_key_id: str | None


@dataclass(frozen=True)
class BatchRecord:
    """A usage record accepted by BatchMeterUsage; ``usage_record`` is as received."""

    metering_record_id: str
    product: str
    customer: str
    dimension: str
    hour: datetime
    quantity: Decimal
    allocations: Allocations | None
    usage_record: dict[str, Any]


@dataclass(frozen=True)
class _PreparedRecord:
    """A batch record that passed every check, ready to be processed."""

    raw: dict[str, Any]
    product: str
    customer: str
    hour: datetime
    quantity: Decimal
    allocations: Allocations | None


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class MeteringState:
    """Records, configuration and the four Metering operations.

    All mutation happens under ``self.lock`` because the server thread handles
    requests while the test thread configures the fake and reads its records.
    """

    def __init__(
        self,
        products: set[str] | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        """Set up empty state; ``products=None`` accepts any product code."""
        self.lock = threading.RLock()
        self.products = products
        self.clock: Callable[[], datetime] = clock or (lambda: datetime.now(UTC))
        # How old a timestamp may be: MeterUsage 6 hours; BatchMeterUsage 24 hours,
        # and never past its month's close (see ``check_month_close``).
        self.meter_window = timedelta(hours=6)
        self.batch_window = timedelta(hours=24)
        # How far in the future a timestamp may be, for clock drift between hosts.
        self.future_tolerance = timedelta(minutes=5)
        # None accepts every dimension; a set makes others InvalidUsageDimension.
        self.dimensions: set[str] | None = None
        self.faults = FaultPlan()
        self.meter_usage_records: dict[MeterUsageGrain, MeterUsageRecord] = {}
        self.client_tokens: dict[str, dict[str, Any]] = {}
        self.batch_records: dict[BatchGrain, BatchRecord] = {}
        self.unsubscribed_customers: set[str] = set()
        self.invalid_licenses: set[str] = set()
        # LicenseArn -> product code; an unmapped LicenseArn is its own product.
        self.license_products: dict[str, str] = {}
        self.registration_tokens: dict[str, dict[str, Any]] = {}
        self.expired_tokens: set[str] = set()
        self.unentitled = False
        self.registrations: list[dict[str, Any]] = []

    def reset_state(self) -> None:
        """Forget records, tokens, faults and per-test configuration sets."""
        with self.lock:
            self.faults.clear()
            self.meter_usage_records.clear()
            self.client_tokens.clear()
            self.batch_records.clear()
            self.unsubscribed_customers.clear()
            self.invalid_licenses.clear()
            self.license_products.clear()
            self.registration_tokens.clear()
            self.expired_tokens.clear()
            self.unentitled = False
            self.registrations.clear()

    def _check_product(self, product_code: str) -> None:
        if self.products is not None and product_code not in self.products:
            raise AwsError(
                "InvalidProductCodeException", f"Product code {product_code!r} is not valid."
            )

    def _check_dimension(self, dimension: str) -> None:
        if self.dimensions is not None and dimension not in self.dimensions:
            raise AwsError(
                "InvalidUsageDimensionException", f"Usage dimension {dimension!r} is not valid."
            )

    def meter_usage(
        self, params: dict[str, Any], access_key_id: str | None = None
    ) -> dict[str, Any]:
        """MeterUsage: one record per (product, dimension, hour), idempotent by value."""
        now = self.clock()
        product, dimension = params["ProductCode"], params["UsageDimension"]
        self._check_product(product)
        self._check_dimension(dimension)
        quantity, kind = parse_quantity(params, "UsageQuantity", "UsageQuantityAsDecimal")
        allocations = normalize_allocations(params.get("UsageAllocations"), quantity, kind)
        when = check_timestamp(params["Timestamp"], now, self.meter_window, self.future_tolerance)
        if params.get("DryRun") is True:
            raise AwsError("DryRunOperation", DRY_RUN_MESSAGE, status=412)
        token = params.get("ClientToken")
        # AWS: same token requires exactly the same other parameters.
        request_params = {k: v for k, v in params.items() if k != "ClientToken"}
        with self.lock:
            if token is not None:
                previous = self.client_tokens.get(token)
                if previous is not None and previous != request_params:
                    raise AwsError(
                        "IdempotencyConflictException",
                        "The ClientToken is being used for multiple requests.",
                    )
            grain: MeterUsageGrain = (product, dimension, hour_of(when))
            existing = self.meter_usage_records.get(grain)
            if existing is None:
                existing = MeterUsageRecord(
                    metering_record_id=str(uuid.uuid4()),
                    product_code=product,
                    dimension=dimension,
                    hour=grain[2],
                    timestamp=when,
                    quantity=quantity,
                    allocations=allocations,
                    client_token=token,
                    access_key_id=access_key_id,
                )
                self.meter_usage_records[grain] = existing
            elif existing.quantity != quantity or existing.allocations != allocations:
                raise AwsError(
                    "DuplicateRequestException",
                    "A metering record has already been emitted for the given "
                    f"{{usageDimension, timestamp}} ({dimension}, {grain[2].isoformat()}) with "
                    f"a different usageQuantity ({existing.quantity} != {quantity}) or "
                    "usage allocations.",
                )
            if token is not None:
                self.client_tokens.setdefault(token, request_params)
            return {"MeteringRecordId": existing.metering_record_id}

    def _batch_scope(self, params: dict[str, Any], body_size: int) -> None:
        """Request-level BatchMeterUsage checks: size, ProductCode vs LicenseArn, one product."""
        if body_size >= MAX_BATCH_BODY:
            raise AwsError(
                "ValidationException", "BatchMeterUsage requests must be less than 1MB in size."
            )
        records: list[dict[str, Any]] = params["UsageRecords"]
        product_code: str | None = params.get("ProductCode")
        licensed = [r["LicenseArn"] for r in records if r.get("LicenseArn") is not None]
        if licensed and product_code is not None:
            raise AwsError("ValidationException", "ProductCode must not be sent with LicenseArn.")
        if licensed and len(licensed) != len(records):
            raise AwsError(
                "ValidationException",
                "Usage records with and without LicenseArn cannot be mixed in one request.",
            )
        if records and not licensed and product_code is None:
            raise AwsError(
                "ValidationException",
                "ProductCode is required when usage records do not specify LicenseArn.",
            )
        if len({self.license_products.get(arn, arn) for arn in licensed}) > 1:
            raise AwsError(
                "ValidationException",
                "Each BatchMeterUsage request must be for only one product.",
            )
        if product_code is not None:
            self._check_product(product_code)

    def _prepare_batch_record(
        self, record: dict[str, Any], product_code: str | None, now: datetime
    ) -> _PreparedRecord:
        """Per-record checks; any failure fails the whole call."""
        identifier = record.get("CustomerIdentifier")
        account = record.get("CustomerAWSAccountId")
        if identifier is not None and account is not None:
            raise AwsError(
                "ValidationException",
                "CustomerIdentifier and CustomerAWSAccountId are mutually exclusive.",
            )
        customer = identifier if identifier is not None else account
        if customer is None:
            raise AwsError(
                "InvalidCustomerIdentifierException",
                "Each usage record needs a CustomerIdentifier or a CustomerAWSAccountId.",
            )
        license_arn: str | None = record.get("LicenseArn")
        if license_arn is not None and license_arn in self.invalid_licenses:
            raise AwsError("InvalidLicenseException", f"License {license_arn} is not valid.")
        self._check_dimension(record["Dimension"])
        quantity, kind = parse_quantity(record, "Quantity", "QuantityAsDecimal")
        allocations = normalize_allocations(record.get("UsageAllocations"), quantity, kind)
        when = check_timestamp(record["Timestamp"], now, self.batch_window, self.future_tolerance)
        check_month_close(when, now)
        product = license_arn if license_arn is not None else product_code
        assert product is not None  # _batch_scope guarantees one of the two
        return _PreparedRecord(record, product, customer, hour_of(when), quantity, allocations)

    def batch_meter_usage(self, params: dict[str, Any], body_size: int) -> dict[str, Any]:
        """BatchMeterUsage: all-or-nothing validation, then per-record results."""
        now = self.clock()
        self._batch_scope(params, body_size)
        prepared = [
            self._prepare_batch_record(record, params.get("ProductCode"), now)
            for record in params["UsageRecords"]
        ]
        results: list[dict[str, Any]] = []
        unprocessed: list[dict[str, Any]] = []
        with self.lock:
            for item in prepared:
                if self.faults.take_unprocessed():
                    unprocessed.append(item.raw)
                    continue
                if item.customer in self.unsubscribed_customers:
                    results.append({"UsageRecord": item.raw, "Status": "CustomerNotSubscribed"})
                    continue
                grain: BatchGrain = (item.product, item.customer, item.raw["Dimension"], item.hour)
                existing = self.batch_records.get(grain)
                if existing is None:
                    existing = BatchRecord(
                        metering_record_id=str(uuid.uuid4()),
                        product=item.product,
                        customer=item.customer,
                        dimension=item.raw["Dimension"],
                        hour=item.hour,
                        quantity=item.quantity,
                        allocations=item.allocations,
                        usage_record=item.raw,
                    )
                    self.batch_records[grain] = existing
                elif existing.quantity != item.quantity or existing.allocations != item.allocations:
                    results.append({"UsageRecord": item.raw, "Status": "DuplicateRecord"})
                    continue
                results.append(
                    {
                        "UsageRecord": item.raw,
                        "MeteringRecordId": existing.metering_record_id,
                        "Status": "Success",
                    }
                )
        return {"Results": results, "UnprocessedRecords": unprocessed}

    def resolve_customer(self, params: dict[str, Any]) -> dict[str, Any]:
        """ResolveCustomer: look the registration token up in ``registration_tokens``."""
        token = params["RegistrationToken"]
        with self.lock:
            if token in self.expired_tokens:
                # HTTP 400: this is the registration-token error, not the 403
                # credential error of the same name.
                raise AwsError(
                    "ExpiredTokenException", "The submitted registration token has expired."
                )
            result = self.registration_tokens.get(token)
        if result is None:
            raise AwsError("InvalidTokenException", "Registration token is invalid.")
        return dict(result)

    def register_usage(self, params: dict[str, Any]) -> dict[str, Any]:
        """RegisterUsage: entitlement check returning a JWT-shaped signature."""
        now = self.clock()
        self._check_product(params["ProductCode"])
        if params["PublicKeyVersion"] != 1:
            raise AwsError(
                "InvalidPublicKeyVersionException",
                f"Public key version {params['PublicKeyVersion']} is not valid.",
            )
        if self.unentitled:
            raise AwsError(
                "CustomerNotEntitledException",
                "Customer does not have a valid subscription for the product.",
            )
        payload = {
            "productCode": params["ProductCode"],
            "publicKeyVersion": params["PublicKeyVersion"],
            "nonce": params.get("Nonce"),
            "issuedAt": now.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
        }
        header = {"alg": "PS256", "typ": "JWT"}
        signature = ".".join(
            [
                _b64url(json.dumps(header, separators=(",", ":")).encode()),
                _b64url(json.dumps(payload, separators=(",", ":")).encode()),
                # Random bytes: nothing can verify it, but it has a real signature's shape.
                _b64url(secrets.token_bytes(256)),
            ]
        )
        with self.lock:
            self.registrations.append(payload)
        rotation = now.replace(microsecond=0) + timedelta(days=30)
        return {"Signature": signature, "PublicKeyRotationTimestamp": int(rotation.timestamp())}
