"""Generated from proto/ by scripts.protogen; do not edit."""
