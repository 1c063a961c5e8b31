"""DICOMweb (PS3.18): STOW-RS in (:mod:`.stow_receive`) and out (:mod:`.stow_send`).

:mod:`.multipart` splits ``multipart/related`` request bodies as they stream in; :mod:`.status` maps the node's
C-STORE statuses to STOW-RS failure reasons and builds the Store Instances Response (PS3.18 10.5.3, Annex I).
"""
