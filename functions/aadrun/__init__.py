"""aadrun: Microsoft Entra ID group membership as the source of truth for Cloud Run access."""
