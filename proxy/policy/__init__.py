"""Purpose policy: decides whether a purpose may use what a statement touches."""
