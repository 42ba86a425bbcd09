"""Generated from proto/ by fedmae.protogen; do not edit."""
