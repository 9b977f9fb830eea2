"""A synthetic tenant for the demo and the benchmark, set up through the
planes' admin APIs: ledger accounts for the synthetic customers and merchants
(triplane_sim.synth), the offer catalog of the synthetic offers with their
catalog entries (product, value, attributes: what ranking sees), each
customer's KYC profile (what the policy plane decides payments on), contact
profiles and consents."""

from __future__ import annotations

import time
from dataclasses import dataclass

from triplane.common.v1 import types_pb2
from triplane.money.v1 import money_pb2
from triplane.policy.v1 import policy_pb2
from triplane.runtime import codec as wire
from triplane_client import LedgerAdminClient, PolicyAdminClient, TlsFiles
from triplane_sim import synth

ACCOUNTS_PER_CALL = 500
DAY_US = 86_400_000_000
# The synthetic customers' KYC tiers, in turn: mostly verified, a few light.
KYC_TIERS = (1, 2, 2, 3)


def kyc_profile(
    tenant_id: str, customer_id: str, index: int, now_us: int
) -> policy_pb2.CustomerProfile:
    """The KYC result the synthetic platform recorded for its index-th
    customer: a tier in turn, an account opened 30 to 1,029 days ago."""
    opened_us = now_us - (30 + (index * 37) % 1000) * DAY_US
    return policy_pb2.CustomerProfile(
        tenant_id=tenant_id,
        customer_id=customer_id,
        kyc_tier=KYC_TIERS[index % len(KYC_TIERS)],
        country="US",
        account_opened_at=wire.timestamp(opened_us),
        verified_at=wire.timestamp(opened_us + DAY_US),
    )


def product_enum(product: str) -> policy_pb2.Product.ValueType:
    """The policy plane's Product for a catalog product name ("bnpl")."""
    return policy_pb2.Product.Value(f"PRODUCT_{product.upper()}")


def daytime_zone(now_s: float | None = None) -> str:
    """An IANA zone where it is about noon now, so marketing quiet hours
    (21:00-08:00 local by default) never empty a demo run at night."""
    hour = int(((time.time() if now_s is None else now_s) // 3600) % 24)
    offset = (12 - hour + 11) % 24 - 11  # in -11..12
    if offset == 0:
        return "UTC"
    # Etc/GMT zones have the POSIX sign: Etc/GMT-2 is UTC+2.
    return f"Etc/GMT{'-' if offset > 0 else '+'}{abs(offset)}"


@dataclass(frozen=True, slots=True)
class World:
    tenant_id: str
    customers: list[synth.Customer]
    merchants: list[synth.Merchant]
    currency: str = "USD"

    def customer_id(self, customer: synth.Customer) -> str:
        return f"c_{customer.account_id}"


async def seed(
    money_address: str,
    policy_address: str,
    tenant_id: str,
    customers: int,
    merchants: int,
    seed_value: int = 7,
    *,
    tls: TlsFiles | None = None,
) -> World:
    """Creates the tenant, its accounts, offers and profiles through the admin
    clients; `tls`: the admin identity's files (None: plaintext)."""
    data = synth.generate(
        synth.SynthConfig(
            seed=seed_value, tenant_id=tenant_id, customers=customers, merchants=merchants, days=2
        )
    )
    ledger = LedgerAdminClient(money_address, timeout_s=30, tls=tls)
    policy = PolicyAdminClient(policy_address, timeout_s=30, tls=tls)
    try:
        await ledger.create_tenant(tenant_id, "synthetic")
        ids = [c.account_id for c in data.customers] + [m.merchant_id for m in data.merchants]
        for start in range(0, len(ids), ACCOUNTS_PER_CALL):
            await ledger.create_accounts(
                tenant_id,
                [
                    money_pb2.NewAccount(
                        account_id=account_id,
                        currency="USD",
                        kind=money_pb2.ACCOUNT_KIND_LIABILITY,
                        constraint=money_pb2.BALANCE_CONSTRAINT_NONE,
                    )
                    for account_id in ids[start : start + ACCOUNTS_PER_CALL]
                ],
            )
        await policy.create_tenant(tenant_id, "synthetic")
        for offer_id, entry in synth.CATALOG.items():
            await policy.put_offer(
                policy_pb2.Offer(
                    tenant_id=tenant_id,
                    offer_id=offer_id,
                    product=product_enum(entry.product),
                    title=offer_id.replace("_", " "),
                    value=types_pb2.Money(amount_minor=entry.value_minor, currency="USD"),
                    attributes=dict(entry.attributes),
                    eligibility="customer.kyc_tier >= 2"
                    if offer_id == "credit_line_increase"
                    else "",
                    topic=policy_pb2.TOPIC_MARKETING,
                    channels=[policy_pb2.CHANNEL_IN_APP, policy_pb2.CHANNEL_PUSH],
                    cooldown_s=1,
                )
            )
        world = World(tenant_id, data.customers, data.merchants)
        zone = daytime_zone()
        now_us = int(time.time() * 1_000_000)
        for index, customer in enumerate(data.customers):
            customer_id = world.customer_id(customer)
            await policy.put_customer_profile(
                kyc_profile(tenant_id, customer_id, index, now_us),
                change_id=f"kyc-{customer_id}",
                actor="synthetic-kyc",
            )
            await policy.put_contact_profile(
                policy_pb2.ContactProfile(
                    tenant_id=tenant_id, customer_id=customer_id, time_zone=zone
                )
            )
            if index % 10 == 9:
                continue  # one customer in ten never consented to marketing
            for channel in (policy_pb2.CHANNEL_IN_APP, policy_pb2.CHANNEL_PUSH):
                await policy.set_consent(
                    tenant_id,
                    customer_id,
                    policy_pb2.Consent(
                        channel=channel,
                        topic=policy_pb2.TOPIC_MARKETING,
                        status=policy_pb2.CONSENT_STATUS_GRANTED,
                        lawful_basis=policy_pb2.LAWFUL_BASIS_CONSENT,
                    ),
                )
        return world
    finally:
        await ledger.close()
        await policy.close()
