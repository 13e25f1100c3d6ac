#!/usr/bin/env python3
"""payra from Python: enroll a device key, sign a payment intent, verify it.

A reference for payment-backend and SDK authors. It plays both parties of the flow:

  1. the payment service (mutual TLS with certs/service.pem) asks payra for a one-time
     enrollment token for a customer          -> payra.v1.Registration/CreateEnrollmentToken
  2. the phone (TLS, no client certificate) generates an EC P-256 key and sends a PKCS#10
     CSR with that token                       -> payra.v1.Enrollment/Enroll
  3. the phone signs a PaymentIntent with its key, and the payment service asks payra to
     verify it and to decide the limit tier    -> payra.v1.Verification/VerifyPayment

In production, steps 2 and the signing half of 3 run on the phone (Android Keystore, iOS
Secure Enclave); only the payment service talks to payra with a client certificate.

The gRPC stubs are generated at run time from proto/payra/v1/*.proto, so the example always
matches the contract in this repository and no generated code is committed.

Usage:
  python payra_example.py --server localhost:8443 --certs certs

Exit status: 0 when both payments are VERDICT_VERIFIED in TIER_A, 1 otherwise, 2 on a
usage or connection error.
"""

import argparse
import atexit
import importlib
import importlib.resources
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

# What a device signs is this prefix followed by the serialized PaymentIntent. The prefix
# (23 ASCII bytes, ending in a line feed) separates payment signatures from anything else
# the same key might ever sign. See docs/payment-signature.md.
SIGNATURE_PREFIX = b"payra.v1.PaymentIntent\n"

# Every RPC gets a deadline, so a stuck server or network never hangs the caller.
RPC_TIMEOUT_S = 10.0

REPO_ROOT = Path(__file__).resolve().parents[2]


class ExampleError(Exception):
    """An error with a message meant for the person running the example."""


# ---------------------------------------------------------------------------------------
# Generated code, compiled at run time
# ---------------------------------------------------------------------------------------


def load_payra_protos(proto_root):
    """Compiles proto_root/payra/v1/*.proto with grpc_tools.protoc and imports the result.

    Returns a dict of module name -> module, e.g. "verification_pb2", "verification_pb2_grpc".
    """
    # Imported here so that a missing grpcio-tools gives a clear message, not a traceback.
    try:
        from grpc_tools import protoc
    except ImportError as exc:
        raise ExampleError(
            "grpcio-tools is not installed: pip install -r requirements.txt"
        ) from exc

    proto_dir = proto_root / "payra" / "v1"
    proto_files = sorted(proto_dir.glob("*.proto"))
    if not proto_files:
        raise ExampleError(f"no .proto files in {proto_dir}; pass --proto DIR")

    # The protos import each other as "payra/v1/common.proto", so proto_root is the include
    # path. grpc_tools ships the well-known types (google/protobuf/*.proto) in _proto.
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    out_dir = tempfile.mkdtemp(prefix="payra-protos-")
    atexit.register(shutil.rmtree, out_dir, ignore_errors=True)
    args = [
        "grpc_tools.protoc",
        f"--proto_path={proto_root}",
        f"--proto_path={well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p) for p in proto_files],
    ]
    if protoc.main(args) != 0:
        raise ExampleError(f"protoc failed on {proto_dir} (its messages are above)")

    # The generated modules are the package payra.v1 (a namespace package: no __init__.py).
    sys.path.insert(0, out_dir)
    modules = {}
    for proto in proto_files:
        for suffix in ("_pb2", "_pb2_grpc"):
            name = proto.stem + suffix
            modules[name] = importlib.import_module(f"payra.v1.{name}")
    return modules


# ---------------------------------------------------------------------------------------
# Channels
# ---------------------------------------------------------------------------------------


def read_file(path):
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ExampleError(f"cannot read {path}: {exc.strerror}") from exc


def secure_channel(server, tls_server_name, root_pem, cert_pem=None, key_pem=None):
    """A TLS channel that trusts only payra's root. With cert_pem and key_pem: mutual TLS."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=root_pem, private_key=key_pem, certificate_chain=cert_pem
    )
    # The name checked against the server certificate (and sent as SNI). The development
    # server certificate is for "localhost", 127.0.0.1 and ::1.
    options = [("grpc.ssl_target_name_override", tls_server_name)]
    return grpc.secure_channel(server, credentials, options=options)


def call(what, server, method, request):
    """Calls one RPC with a deadline and turns gRPC errors into readable messages."""
    try:
        return method(request, timeout=RPC_TIMEOUT_S)
    except grpc.RpcError as err:
        code, details = err.code(), err.details()
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            raise ExampleError(
                f"cannot reach payra at {server} ({what}): {code.name}: {details}\n"
                "  Is the server running on that address? Do --certs and the TLS server "
                "name match the server's PKI?"
            ) from None
        if code == grpc.StatusCode.UNAUTHENTICATED or code == grpc.StatusCode.PERMISSION_DENIED:
            raise ExampleError(
                f"{what} refused: {code.name}: {details}\n"
                "  Check the client certificate (service.pem / service.key) and its role."
            ) from None
        raise ExampleError(f"{what} failed: {code.name}: {details}") from None


# ---------------------------------------------------------------------------------------
# The phone's side: key, CSR, signed intent
# ---------------------------------------------------------------------------------------


def make_csr_der(private_key, device_id):
    """A PKCS#10 CSR, DER. payra uses only its public key (EC P-256) and decides the
    certificate's content itself; the subject here is just a courtesy."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .sign(private_key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.DER)


def der_to_raw(signature_der):
    """ECDSA DER (SEQUENCE { r, s }) -> raw r||s, 64 bytes, each big-endian, left-padded to
    32 bytes: the JOSE / WebCrypto / CryptoKit rawRepresentation encoding."""
    r, s = decode_dss_signature(signature_der)
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def sign_intent(private_key, intent_bytes):
    """ECDSA P-256 with SHA-256 over prefix || intent_bytes. Returns the DER signature,
    which is what cryptography (and Android Keystore, and iOS) produce."""
    return private_key.sign(SIGNATURE_PREFIX + intent_bytes, ec.ECDSA(hashes.SHA256()))


# ---------------------------------------------------------------------------------------
# The same for an SM2 phone (--algorithm sm2): GB/T 32918 signatures with SM3, in pure
# Python with gmssl, and the CSR's DER written out by hand (cryptography has no SM2).
# ---------------------------------------------------------------------------------------

SM2_N = int("FFFFFFFEFFFFFFFFFFFFFFFFFFFFFFFF7203DF6B21C6052B53BBF40939D54123", 16)
OID_EC_PUBLIC_KEY = "1.2.840.10045.2.1"
OID_SM2_CURVE = "1.2.156.10197.1.301"
OID_SM2_WITH_SM3 = "1.2.156.10197.1.501"
OID_COMMON_NAME = "2.5.4.3"


def der(tag, content):
    """One DER TLV."""
    n = len(content)
    if n < 0x80:
        length = bytes([n])
    else:
        octets = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(octets)]) + octets
    return bytes([tag]) + length + content


def der_int(value):
    return der(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def der_oid(dotted):
    arcs = [int(a) for a in dotted.split(".")]
    out = bytes([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out += bytes(reversed(chunk))
    return der(0x06, out)


def der_seq(*items):
    return der(0x30, b"".join(items))


class Sm2Key:
    """An SM2 key pair. Every signature uses the default distinguishing id
    1234567812345678 (gmssl's Z value uses it) and a nonce from the secrets module: gmssl's
    own default nonce comes from the random module, which is not a CSPRNG, and a predictable
    SM2 nonce gives the private key away."""

    def __init__(self):
        from gmssl import sm2
        self.d = secrets.randbelow(SM2_N - 2) + 1
        crypt = sm2.CryptSM2(private_key="%064x" % self.d, public_key="")
        # x || y as 128 hex digits. Set directly: gmssl's constructor strips a leading "04"
        # with str.lstrip, which also eats a point whose x starts with 0 or 4.
        crypt.public_key = crypt._kg(self.d, sm2.default_ecc_table["g"])
        self.crypt = crypt
        self.point = b"\x04" + bytes.fromhex(crypt.public_key)

    def sign(self, message):
        """SM2 with SM3 over message, DER SEQUENCE { r, s }."""
        while True:
            k = "%064x" % (secrets.randbelow(SM2_N - 1) + 1)
            raw = self.crypt.sign_with_sm3(message, k)
            if raw:
                r, s = int(raw[:64], 16), int(raw[64:], 16)
                return der_seq(der_int(r), der_int(s))


def make_sm2_csr_der(key, device_id):
    """A PKCS#10 CSR for an SM2 key, signed SM2-with-SM3, as `openssl req -sm3 -sigopt
    distid:1234567812345678` makes one."""
    subject = der_seq(der(0x31, der_seq(der_oid(OID_COMMON_NAME),
                                        der(0x0C, device_id.encode()))))
    spki = der_seq(der_seq(der_oid(OID_EC_PUBLIC_KEY), der_oid(OID_SM2_CURVE)),
                   der(0x03, b"\x00" + key.point))
    info = der_seq(der_int(0), subject, spki, der(0xA0, b""))
    signature = key.sign(info)
    return der_seq(info, der_seq(der_oid(OID_SM2_WITH_SM3)), der(0x03, b"\x00" + signature))


def fen_to_cny(fen):
    """Formats an amount in fen for display, with integer arithmetic only."""
    sign = "-" if fen < 0 else ""
    fen = abs(fen)
    return f"{sign}{fen // 100}.{fen % 100:02d} CNY"


# ---------------------------------------------------------------------------------------
# The flow
# ---------------------------------------------------------------------------------------


def payment_request(pb, private_key, serial, customer_id, device_id, order_id, amount_fen,
                    encoding):
    """Signs one payment as the phone; returns the VerifyPaymentRequest the payment service
    sends for it."""
    v = pb["verification_pb2"]
    merchant_id = "m-coffee-42"

    # --- On the phone -------------------------------------------------------------------
    intent = v.PaymentIntent(
        customer_id=customer_id,        # must be the certificate's customer and device
        device_id=device_id,
        merchant_id=merchant_id,
        order_id=order_id,
        # Money is an integer number of fen (1 CNY = 100 fen), never a float: 12.34 CNY is
        # 1234 fen, exactly, on every platform and in every language.
        amount_fen=amount_fen,
        currency="CNY",
        created_at_ms=time.time_ns() // 1_000_000,  # Unix milliseconds, the phone's clock
        # 16-64 fresh bytes from a CSPRNG; payra accepts each (certificate, nonce) pair once.
        nonce=secrets.token_bytes(32),
        scene=v.SCENE_IN_APP,
    )
    # Serialize ONCE and keep these exact bytes: they are what gets signed and what is sent.
    # Never re-serialize the message later (or on the server side): protobuf encoders are
    # not required to be byte-identical, and payra verifies the bytes it is given.
    intent_bytes = intent.SerializeToString()

    if isinstance(private_key, Sm2Key):
        # SM2 with SM3 over the same bytes, with the default distinguishing id.
        signature = private_key.sign(SIGNATURE_PREFIX + intent_bytes)
    else:
        signature = sign_intent(private_key, intent_bytes)
    if encoding == "raw":
        # payra also accepts raw r||s (64 bytes), for platforms that produce that encoding.
        signature = der_to_raw(signature)

    # --- On the payment service ---------------------------------------------------------
    # The phone sends intent_bytes, the signature and its certificate serial to the payment
    # service, which forwards them unchanged, together with the transaction it is about to
    # execute and the factors it verified itself.
    request = v.VerifyPaymentRequest(
        intent=intent_bytes,
        signature=signature,
        certificate_serial=serial,
        # payra compares these with the signed intent, byte for byte.
        transaction=v.Transaction(
            merchant_id=merchant_id, order_id=order_id, amount_fen=amount_fen, currency="CNY"
        ),
        # The service checked the customer's payment PIN (knowledge). With the device
        # certificate (possession), that is two categories including a certificate: tier A.
        factors=[v.Factor(category=v.FACTOR_CATEGORY_KNOWLEDGE, method="payment_pin")],
        # Add the amount to today's ledger. If the payment then fails downstream, give it
        # back with Verification/ReleaseReservation(evidence_id).
        reserve=True,
    )
    return request


def show(pb, request, response, encoding):
    """Prints one payment's answer; True when the verdict is VERIFIED and the tier is A."""
    v = pb["verification_pb2"]
    tx = request.transaction
    # A refused payment is an OK response with a verdict and a reason, not a gRPC error.
    limit = response.limit
    print(f"payment {tx.order_id}: {fen_to_cny(tx.amount_fen)}, "
          f"{encoding.upper()} signature ({len(request.signature)} bytes)")
    print(f"  verdict:    {v.Verdict.Name(response.verdict)}")
    if response.reason:
        print(f"  reason:     {response.reason}")
    print(f"  tier:       {v.Tier.Name(response.tier)}")
    print("  categories: "
          + (", ".join(v.FactorCategory.Name(c) for c in response.categories) or "(none)"))
    print(f"  limit:      {fen_to_cny(limit.limit_fen)} ({limit.limit_fen} fen), "
          f"used {limit.used_fen} fen, remaining {limit.remaining_fen} fen, "
          f"fits={limit.fits}, reserved={limit.reserved}, day {limit.day}")
    print(f"  evidence:   {response.evidence_id}")

    return response.verdict == v.VERDICT_VERIFIED and response.tier == v.TIER_A


def run(args):
    certs = Path(args.certs)
    root_pem = read_file(certs / "root.pem")
    service_pem = read_file(certs / "service.pem")
    service_key = read_file(certs / "service.key")

    pb = load_payra_protos(Path(args.proto))
    registration_grpc = pb["registration_pb2_grpc"]
    enrollment_grpc = pb["enrollment_pb2_grpc"]
    verification_grpc = pb["verification_pb2_grpc"]
    registration = pb["registration_pb2"]
    enrollment = pb["enrollment_pb2"]
    common = pb["common_pb2"]

    # The payment service authenticates with its client certificate (role "service").
    service_channel = secure_channel(
        args.server, args.tls_server_name, root_pem, service_pem, service_key
    )
    # The phone has no client certificate yet: server-authenticated TLS only.
    phone_channel = secure_channel(args.server, args.tls_server_name, root_pem)

    with service_channel, phone_channel:
        # (1) Payment service: a one-time enrollment token, after its own KYC of the customer.
        token_response = call(
            "CreateEnrollmentToken",
            args.server,
            registration_grpc.RegistrationStub(service_channel).CreateEnrollmentToken,
            registration.CreateEnrollmentTokenRequest(customer_id=args.customer),
        )
        print(f"token for customer {args.customer}: expires at "
              f"{token_response.expires_at_unix_s} (Unix s)")

        # (2) Phone: a P-256 key that never leaves the device, and a CSR for it. On a real
        # phone the key lives in Android Keystore / the Secure Enclave. With --algorithm sm2,
        # an SM2 key, which payra certifies from its SM2 issuing CA.
        if args.algorithm == "sm2":
            device_key = Sm2Key()
            csr_der = make_sm2_csr_der(device_key, args.device)
        else:
            device_key = ec.generate_private_key(ec.SECP256R1())
            csr_der = make_csr_der(device_key, args.device)
        enroll_response = call(
            "Enroll",
            args.server,
            enrollment_grpc.EnrollmentStub(phone_channel).Enroll,
            enrollment.EnrollRequest(
                token=token_response.token,
                csr_der=csr_der,
                device_id=args.device,
                # Informational only: stored with the record, never put in the certificate.
                device_info=common.DeviceInfo(
                    platform="python", model="example", os_version=sys.platform,
                    app_version="1.0.0",
                ),
            ),
        )
        certificate = x509.load_der_x509_certificate(enroll_response.certificate_der)
        if isinstance(device_key, Sm2Key):
            # cryptography reads SM2 certificates but not SM2 keys: find the point instead.
            if device_key.point not in enroll_response.certificate_der:
                raise ExampleError("the enrolled certificate is not for our key")
            if certificate.signature_algorithm_oid.dotted_string != OID_SM2_WITH_SM3:
                raise ExampleError("an SM2 key's certificate must be signed SM2-with-SM3")
        elif certificate.public_key().public_numbers() != device_key.public_key().public_numbers():
            raise ExampleError("the enrolled certificate is not for our key")
        try:
            san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            uris = san.value.get_values_for_type(x509.UniformResourceIdentifier)
        except x509.ExtensionNotFound:
            uris = []
        print(f"enrolled device {args.device} ({args.algorithm}): serial {enroll_response.serial}")
        print(f"  subject:  {certificate.subject.rfc4514_string()}")
        print(f"  SAN URIs: {', '.join(uris) or '(none)'}")
        print(f"  valid:    {enroll_response.not_before_unix_s} .. "
              f"{enroll_response.not_after_unix_s} (Unix s)")

        # (3) Two payments: one with the DER signature as cryptography returns it, one with
        # the same kind of signature converted to raw r||s. Both must be VERIFIED in tier A.
        verification = verification_grpc.VerificationStub(service_channel)
        v = pb["verification_pb2"]
        results = []
        for order_id, amount_fen, encoding in (
            (f"order-{secrets.token_hex(4)}-1", 1234, "der"),  # 12.34 CNY
            (f"order-{secrets.token_hex(4)}-2", 500, "raw"),   #  5.00 CNY
        ):
            request = payment_request(
                pb, device_key, enroll_response.serial, args.customer, args.device,
                order_id, amount_fen, encoding,
            )
            response = call("VerifyPayment", args.server, verification.VerifyPayment, request)
            results.append(show(pb, request, response, encoding))

        # (4) At a peak, the payment service may gather the payments that arrived together
        # and send up to 100 in one VerifyPayments call: each is decided exactly as
        # VerifyPayment would decide it, and its result comes back at its index, either a
        # decision (a verdict, as above) or the error VerifyPayment would have returned.
        batch = [
            payment_request(
                pb, device_key, enroll_response.serial, args.customer, args.device,
                f"order-{secrets.token_hex(4)}-{n}", 100 * n, "der",
            )
            for n in (3, 4)
        ]
        answer = call(
            "VerifyPayments", args.server, verification.VerifyPayments,
            v.VerifyPaymentsRequest(payments=batch),
        )
        print(f"batch of {len(batch)} in one VerifyPayments call:")
        for request, result in zip(batch, answer.results):
            if result.WhichOneof("result") == "decision":
                results.append(show(pb, request, result.decision, "der"))
            else:
                print(f"  payment {request.transaction.order_id}: error {result.error.code}: "
                      f"{result.error.message}")
                results.append(False)

    if all(results) and len(results) == 4:
        print("OK: all four payments VERDICT_VERIFIED, TIER_A")
        return 0
    print("FAILED: expected VERDICT_VERIFIED and TIER_A for all four payments", file=sys.stderr)
    return 1


def main():
    parser = argparse.ArgumentParser(
        description="Enroll a device key with payra and verify signed payments over gRPC."
    )
    parser.add_argument("--server", default="localhost:8443",
                        help="payra gRPC address, HOST:PORT (default: %(default)s)")
    parser.add_argument("--certs", default="certs",
                        help="directory with root.pem, service.pem and service.key "
                             "(default: %(default)s)")
    parser.add_argument("--tls-server-name", default="localhost",
                        help="name to check in the server certificate (default: %(default)s)")
    parser.add_argument("--proto", default=str(REPO_ROOT / "proto"),
                        help="directory containing payra/v1/*.proto (default: %(default)s)")
    suffix = secrets.token_hex(4)
    parser.add_argument("--algorithm", choices=("p256", "sm2"), default="p256",
                        help="the device key: EC P-256, or SM2 with SM3 (default: %(default)s)")
    parser.add_argument("--customer", default=f"cust-py-{suffix}",
                        help="customer id (default: a fresh random one)")
    parser.add_argument("--device", default=f"phone-py-{suffix}",
                        help="device id (default: a fresh random one)")
    args = parser.parse_args()

    try:
        return run(args)
    except ExampleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
