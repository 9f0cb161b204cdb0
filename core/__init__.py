"""waflow core: the session engine that keeps WhatsApp conversations correct under real traffic."""
