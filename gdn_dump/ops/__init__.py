"""Pure math, each fast routine beside a plain reference: exact attention, statistics."""
