"""Thin adapters to optional outside libraries; each returns None when its library is absent."""
