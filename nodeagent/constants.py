"""Numbers of the data plane, written down once.

The first part holds numbers fixed by a specification, each with the section it
comes from; changing one breaks interoperability with every other ESP
implementation. The last part holds tuning numbers: Coterie's own choices,
free to change.

References:

- RFC 4303, IP Encapsulating Security Payload (ESP).
- RFC 4106, The Use of Galois/Counter Mode (GCM) in IPsec ESP.
- RFC 6479, IPsec Anti-Replay Algorithm without Bit Shifting.
- IANA Assigned Internet Protocol Numbers (next-header values).
"""

from __future__ import annotations

# ---------------------------------------------------------------------------
# Specification numbers
# ---------------------------------------------------------------------------

# ESP header (RFC 4303 section 2): SPI (2.1) and the low 32 bits of the
# sequence number (2.2), both in network byte order.
SPI_SIZE = 4
SEQ_LOW_SIZE = 4
ESP_HEADER_SIZE = SPI_SIZE + SEQ_LOW_SIZE

# AES-256-GCM in ESP (RFC 4106).
GCM_KEY_SIZE = 32  # section 8.1: AES-256 keying material is a 32-byte key ...
GCM_SALT_SIZE = 4  # ... followed by a 4-byte salt (sections 4 and 8.1)
GCM_IV_SIZE = 8  # section 3.1: the explicit IV carried in each packet
GCM_NONCE_SIZE = GCM_SALT_SIZE + GCM_IV_SIZE  # section 4: nonce = salt || IV
GCM_ICV_SIZE = 16  # section 6: the full-length 16-byte ICV (MUST be supported)

# ESP trailer (RFC 4303 sections 2.4-2.6): Padding, Pad Length, Next Header.
PAD_LENGTH_SIZE = 1
NEXT_HEADER_SIZE = 1
TRAILER_FIXED_SIZE = PAD_LENGTH_SIZE + NEXT_HEADER_SIZE
PAYLOAD_ALIGNMENT = 4  # section 2.4: the ciphertext ends on a 4-byte boundary
MAX_PAD_LENGTH = 255  # section 2.4: Padding is 0 to 255 bytes

# The shortest ESP packet that can carry a trailer at all.
ESP_MIN_PACKET_SIZE = ESP_HEADER_SIZE + GCM_IV_SIZE + TRAILER_FIXED_SIZE + GCM_ICV_SIZE
# Per-packet overhead before padding: header, IV, pad length, next header, ICV.
ESP_OVERHEAD = ESP_MIN_PACKET_SIZE

# Next Header values (RFC 4303 section 2.6, IANA protocol numbers). Tunnel mode
# carries a whole IP packet: IPv4 is 4, IPv6 is 41. 59 ("no next header") marks
# a dummy packet, which the receiver MUST silently discard (section 2.6).
NEXT_HEADER_IPV4 = 4
NEXT_HEADER_IPV6 = 41
NEXT_HEADER_NONE = 59

# Minimum inner header sizes, to read their length fields (RFC 791, RFC 8200).
IPV4_MIN_HEADER_SIZE = 20
IPV6_HEADER_SIZE = 40

# Sequence numbers (RFC 4303 sections 2.2 and 3.3.3). Both counters start at 0
# when the SA is made; the first packet carries 1, so 0 is never valid. The
# counter MUST NOT cycle: a new SA (new key) must be made before it would.
SEQ_FIRST = 1
SEQ_MAX_32 = 2**32 - 1  # the last sequence number of a 32-bit SA
SEQ_MAX_ESN = 2**64 - 1  # the last sequence number of an ESN SA (appendix A)
SEQ_LOW_MASK = 0xFFFF_FFFF
SEQ_LOW_BITS = 32

# Anti-replay window (RFC 4303 section 3.4.3): a receiver MUST support a window
# of at least 32 packets; 64 SHOULD be the default; a larger one MAY be used.
REPLAY_WINDOW_RFC_MINIMUM = 32
REPLAY_WINDOW_RFC_DEFAULT = 64

# RFC 6479: the window is a ring of machine words; one word more than the
# window keeps sliding forward a matter of zeroing words, never shifting bits.
REPLAY_WORD_BITS = 64

# ---------------------------------------------------------------------------
# Tuning numbers (Coterie's choices, not from a specification)
# ---------------------------------------------------------------------------

# DESIGN.md section 3: at least 1024 packets of reordering, for fast paths that
# batch and GSO-coalesce. Any multiple of REPLAY_WORD_BITS works (64, 1024, 4096...).
REPLAY_WINDOW_DEFAULT = 1024
REPLAY_WINDOW_MINIMUM = REPLAY_WORD_BITS  # one word: above the RFC's 32 minimum

# Ask for a rekey long before the hard limit: an SA that has used this many
# sequence numbers should be replaced make-before-break (OutboundSA.needs_rekey,
# for the rekey state machine). Below 2**32, so 32-bit SAs get a margin too.
REKEY_AFTER_PACKETS = 2**32 - 2**16
